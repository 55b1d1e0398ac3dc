//! `convnets devices`: the GPUs this build can use.

use clap::Args;

#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DevicesArgs) -> anyhow::Result<()> {
    let gpus = convnets_pipeline::device::gpus()?;
    if args.json {
        let doc = serde_json::json!({
            "cuda_built": convnets_pipeline::device::cuda_built(),
            "libtorch_cuda": tch::Cuda::is_available(),
            "gpus": gpus,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("libtorch sees CUDA: {}", tch::Cuda::is_available());
    for g in &gpus {
        println!(
            "gpu {}: {} ({:.0} GiB, sm_{}{}), nvJPEG hardware decoder: {}",
            g.index,
            g.name,
            g.total_memory_bytes as f64 / (1u64 << 30) as f64,
            g.compute_capability.0,
            g.compute_capability.1,
            if g.nvjpeg_hardware { "yes" } else { "no" }
        );
    }
    if gpus.is_empty() {
        println!("no GPUs visible");
    }
    Ok(())
}
