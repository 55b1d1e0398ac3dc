//! Training-step throughput of one model, as a JSON line per configuration.
//!
//! `throughput [ARCH] [BATCH] [STEPS]` measures the four combinations of fp16 autocast and
//! channels_last on CUDA device 0 (or the CPU when there is none, with a small input).
//! Build with `--features cuda` for the GPU.

use anyhow::{Context, Result};
use convnets_models::bench::{measure, BenchConfig};
use convnets_models::Arch;
use tch::Device;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arch: Arch = args.get(1).map_or("resnet50", String::as_str).parse()?;
    let device = Device::cuda_if_available();
    let gpu = device.is_cuda();
    let batch: i64 = match args.get(2) {
        Some(b) => b.parse().context("BATCH must be an integer")?,
        None if gpu => 256,
        None => 8,
    };
    let steps: usize = match args.get(3) {
        Some(s) => s.parse().context("STEPS must be an integer")?,
        None if gpu => 30,
        None => 2,
    };
    for (amp, channels_last) in [(false, false), (false, true), (true, false), (true, true)] {
        let config = BenchConfig {
            arch,
            batch,
            amp,
            channels_last,
            device,
            warmup_steps: if gpu { 10 } else { 1 },
            steps,
            image_size: if gpu { 224 } else { 64 },
        };
        println!("{}", measure(&config)?);
    }
    Ok(())
}
