//! Writes the batches the Rust loader makes for a split into one safetensors file, with
//! the loader configured as `convnets train` configures it (`LoaderConfig::preset`); the
//! Python package's tests compare `convnets.Loader` against them.
//!
//! ```text
//! cargo run --example loader_batches -- DATASET OUT.safetensors \
//!     [split=train] [transform=train|eval] [batch=8] [size=32] [dtype=f32|f16|bf16|u8] \
//!     [layout=nchw|nhwc] [seed=0] [rank=0] [world=1] [epochs=1] [threads=2] [start_batch=0]
//! ```
//!
//! Keys: `e{epoch}_b{index}_images` (contiguous NCHW) and `e{epoch}_b{index}_labels`.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use convnets::formats::{Dataset, RecordSource};
use convnets::pipeline::loader::{Crops, LoaderConfig};
use convnets::pipeline::{Layout, Loader, LoaderState, OutputDtype};
use tch::Tensor;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dataset, out, options @ ..] = args.as_slice() else {
        bail!("usage: loader_batches DATASET OUT.safetensors [key=value ...] (see the file's doc)");
    };
    let mut opts: HashMap<&str, &str> = HashMap::new();
    for o in options {
        let (k, v) = o
            .split_once('=')
            .with_context(|| format!("{o}: not key=value"))?;
        opts.insert(k, v);
    }
    let get = |k: &str, default: &'static str| opts.get(k).copied().unwrap_or(default);
    let num = |k: &str, default: &'static str| -> anyhow::Result<u64> {
        get(k, default)
            .parse()
            .with_context(|| format!("{k}={}", get(k, default)))
    };

    let crops = match get("transform", "train") {
        "train" => Crops::Train,
        "eval" => Crops::Eval,
        t => bail!("transform={t}: train or eval"),
    };
    let dtype = match get("dtype", "f32") {
        "f32" => OutputDtype::F32,
        "f16" => OutputDtype::F16,
        "bf16" => OutputDtype::Bf16,
        "u8" => OutputDtype::U8,
        d => bail!("dtype={d}: f32, f16, bf16 or u8"),
    };
    let layout = match get("layout", "nchw") {
        "nchw" => Layout::Nchw,
        "nhwc" => Layout::Nhwc,
        l => bail!("layout={l}: nchw or nhwc"),
    };
    let mut cfg = LoaderConfig::preset(
        crops,
        num("batch", "8")? as usize,
        num("size", "32")? as u32,
        dtype,
        layout,
    );
    cfg.sampler.seed = num("seed", "0")?;
    cfg.sampler.rank = num("rank", "0")? as usize;
    cfg.sampler.world_size = num("world", "1")? as usize;
    cfg.threads = num("threads", "2")? as usize;

    let split: Arc<dyn RecordSource> =
        Arc::new(Dataset::open(dataset)?.split(get("split", "train"))?);
    let start = LoaderState {
        epoch: 0,
        batch: num("start_batch", "0")? as usize,
    };
    let mut loader = Loader::new(split, cfg, start)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for _ in 0..num("epochs", "1")? {
        while let Some(batch) = loader.next_batch() {
            let batch = batch?;
            let key = format!("e{}_b{}", batch.epoch, batch.index);
            tensors.push((format!("{key}_images"), owned(&batch.images)?));
            tensors.push((format!("{key}_labels"), owned(&batch.labels)?));
        }
    }
    Tensor::write_safetensors(&tensors, out)?;
    println!("{} batches written to {out}", tensors.len() / 2);
    Ok(())
}

/// A contiguous copy of `t` (the CPU loader's batch memory is reused once the batch drops).
fn owned(t: &Tensor) -> anyhow::Result<Tensor> {
    let mut out = Tensor::f_empty(t.size(), (t.kind(), t.device()))?;
    out.f_copy_(t)?;
    Ok(out)
}
