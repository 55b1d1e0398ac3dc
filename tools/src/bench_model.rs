//! `convnets bench train`, `bench e2e` and `bench infer`: compute-only training steps,
//! loader + model together with a verdict on which one limits, and inference latency.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use convnets_models::bench::{measure, BenchConfig};
use convnets_models::{Arch, MemoryFormat, ModelConfig};
use convnets_pipeline::cpu::augment::{Layout, OutputDtype, OutputSpec};
use convnets_pipeline::loader::{Backend, Loader, LoaderConfig, LoaderState, Transform};
use convnets_pipeline::plan::RandomResizedCrop;
use convnets_pipeline::sampler::SamplerConfig;
use serde_json::json;
use tch::nn::{ModuleT, OptimizerConfig, Sgd, VarStore};
use tch::{Kind, Tensor};

use crate::bench::{machine, LoaderKind};
use crate::gpu_loader_args::GpuLoaderArgs;
use crate::source::open_split;
use crate::train::{device_of, DeviceArg};

fn print(doc: &serde_json::Value, json_out: bool, table: impl FnOnce()) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(doc)?);
    } else {
        table();
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    #[arg(long, default_value = "resnet50")]
    pub arch: Arch,
    #[arg(long, default_value_t = 256)]
    pub batch_size: i64,
    /// fp16 autocast (GPU).
    #[arg(long)]
    pub amp: bool,
    #[arg(long, default_value_t = 224)]
    pub image_size: i64,
    #[arg(long, default_value_t = 10)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    #[arg(long)]
    pub json: bool,
}

/// Forward + backward + optimizer steps on synthetic data already on the device.
pub fn train(a: TrainBenchArgs) -> anyhow::Result<()> {
    let device = device_of(a.device)?;
    let r = measure(&BenchConfig {
        arch: a.arch,
        batch: a.batch_size,
        amp: a.amp,
        channels_last: device.is_cuda(),
        device,
        warmup_steps: a.warmup_steps,
        steps: a.steps,
        image_size: a.image_size,
    })?;
    let doc = json!({"bench": "train", "machine": machine(), "arch": a.arch.name(), "batch_size": a.batch_size,
        "amp": a.amp, "image_size": a.image_size, "device": format!("{device:?}"), "steps": a.steps,
        "seconds": r.seconds, "images_per_s": r.images_per_sec});
    print(&doc, a.json, || {
        println!("train {} batch {} {:?}{}: {:.0} images/s", a.arch.name(), a.batch_size, device,
            if a.amp { " amp" } else { "" }, r.images_per_sec)
    })
}

#[derive(Debug, Args)]
pub struct E2eBenchArgs {
    /// Dataset folder (or TFRecord folder).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "resnet50")]
    pub arch: Arch,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Loader threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, value_enum, default_value_t = LoaderKind::Cpu)]
    pub loader: LoaderKind,
    #[command(flatten)]
    pub gpu: GpuLoaderArgs,
    #[arg(long)]
    pub amp: bool,
    #[arg(long, default_value_t = 3)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    #[arg(long)]
    pub json: bool,
}

/// Loader and model together: images/s, the share of step time spent waiting for data,
/// and, from a loader-only and a model-only run of the same settings, which one limits.
pub fn e2e(a: E2eBenchArgs) -> anyhow::Result<()> {
    let source = open_split(&a.data, "train", 1)?;
    let doc = e2e_measure(source, &a)?;
    print(&doc, a.json, || {
        println!("e2e {} batch {}: {:.0} images/s, waiting for data {:.1} % of the time", a.arch.name(), a.batch_size,
            doc["images_per_s"].as_f64().unwrap_or(0.0), doc["data_wait_fraction"].as_f64().unwrap_or(0.0) * 100.0);
        println!("{}", doc["verdict"].as_str().unwrap_or_default());
    })
}

/// The measurement behind `bench e2e`, on any record source (`a.data` is not used).
pub fn e2e_measure(source: std::sync::Arc<dyn convnets_formats::RecordSource>, a: &E2eBenchArgs) -> anyhow::Result<serde_json::Value> {
    let device = device_of(a.device)?;
    let gpu = a.loader == LoaderKind::Gpu;
    if gpu && !device.is_cuda() {
        convnets_pipeline::device::gpus()?;
        bail!("--loader gpu needs a GPU (--device cuda or auto)");
    }
    let cfg = LoaderConfig {
        backend: if gpu { Backend::Gpu(a.gpu.options(0)) } else { Backend::Cpu },
        sampler: SamplerConfig { batch_size: a.batch_size, ..Default::default() },
        transform: Transform::Train(RandomResizedCrop::default()),
        output: OutputSpec {
            width: a.image_size,
            height: a.image_size,
            dtype: if a.amp { OutputDtype::F16 } else { OutputDtype::F32 },
            layout: if device.is_cuda() { Layout::Nhwc } else { Layout::Nchw },
            normalize: Some(Default::default()),
        },
        threads: a.threads,
        pin_memory: (device.is_cuda() && !gpu).then_some(device),
        ..LoaderConfig::default()
    };
    let total = a.warmup_steps + a.steps;

    // 1. The loader alone; the batches it prefetched before the clock started are not
    // counted.
    let mut loader = Loader::new(source.clone(), cfg.clone(), LoaderState::default())?;
    let drain = a.warmup_steps + cfg.prefetch + 2;
    let loader_img_s = timed(drain + a.steps, drain, || Ok(next(&mut loader)?.len() as u64))?;
    drop(loader);

    // 2. The model alone on one batch kept on the device; 3. both together.
    let vs = VarStore::new(device);
    let memory_format = if device.is_cuda() { MemoryFormat::ChannelsLast } else { MemoryFormat::Contiguous };
    let model = a.arch.build(&vs.root(), 1000, &ModelConfig { memory_format, ..ModelConfig::default() })?;
    let mut opt = Sgd { momentum: 0.875, ..Default::default() }.build(&vs, 0.01)?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let kind = if a.amp { Kind::Half } else { Kind::Float };
    let mut step = |images: &Tensor, labels: &Tensor| -> anyhow::Result<()> {
        opt.zero_grad();
        let loss = tch::autocast(a.amp, || model.forward_t(images, true))
            .to_kind(Kind::Float)
            .cross_entropy_for_logits(labels);
        loss.backward();
        opt.step();
        let _ = loss.double_value(&[]); // waits for the device
        Ok(())
    };
    let mut loader = Loader::new(source, cfg, LoaderState::default())?;
    let sample = next(&mut loader)?;
    let (images, labels) = (sample.images.to_device(device).to_kind(kind), sample.labels.to_device(device));
    drop(sample);
    let model_img_s = timed(total, a.warmup_steps, || {
        step(&images, &labels)?;
        Ok(a.batch_size as u64)
    })?;

    let mut waited = 0.0;
    let mut measuring = false;
    let mut k = 0;
    let e2e_img_s = timed(total, a.warmup_steps, || {
        measuring = k >= a.warmup_steps;
        k += 1;
        let t = Instant::now();
        let batch = next(&mut loader)?;
        if measuring {
            waited += t.elapsed().as_secs_f64();
        }
        let images = batch.images.to_device_(device, kind, true, false);
        let labels = batch.labels.to_device_(device, Kind::Int64, true, false);
        step(&images, &labels)?;
        Ok(batch.len() as u64)
    })?;
    let measured_s = a.steps as f64 * a.batch_size as f64 / e2e_img_s;
    let wait_fraction = waited / measured_s;
    let input_bound = loader_img_s < model_img_s;
    let verdict = if input_bound {
        format!("input-bound: the loader delivers {loader_img_s:.0} img/s, the model consumes {model_img_s:.0} img/s; try --loader gpu, more --threads, or pack with --max-side")
    } else {
        format!("compute-bound: the loader delivers {loader_img_s:.0} img/s, the model consumes {model_img_s:.0} img/s; the input pipeline keeps up")
    };
    Ok(json!({"bench": "e2e", "machine": machine(), "arch": a.arch.name(), "batch_size": a.batch_size,
        "image_size": a.image_size, "amp": a.amp, "device": format!("{device:?}"), "loader": if gpu { "gpu" } else { "cpu" },
        "loader_threads": a.threads, "steps": a.steps,
        "images_per_s": e2e_img_s, "loader_only_images_per_s": loader_img_s, "model_only_images_per_s": model_img_s,
        "data_wait_fraction": wait_fraction, "input_bound": input_bound, "verdict": verdict}))
}

fn next(loader: &mut Loader) -> anyhow::Result<convnets_pipeline::loader::Batch> {
    loop {
        if let Some(b) = loader.next_batch() {
            return Ok(b?);
        }
    }
}

/// Runs `f` `total` times; images/s over the runs after the first `warmup`.
fn timed(total: usize, warmup: usize, mut f: impl FnMut() -> anyhow::Result<u64>) -> anyhow::Result<f64> {
    let mut images = 0;
    let mut start = Instant::now();
    for i in 0..total {
        if i == warmup {
            start = Instant::now();
            images = 0;
        }
        images += f()?;
    }
    Ok(images as f64 / start.elapsed().as_secs_f64())
}

#[derive(Debug, Args)]
pub struct InferBenchArgs {
    #[arg(long, default_value = "resnet50")]
    pub arch: Arch,
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 64, 256])]
    pub batch_sizes: Vec<i64>,
    #[arg(long)]
    pub amp: bool,
    #[arg(long, default_value_t = 224)]
    pub image_size: i64,
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    #[arg(long)]
    pub json: bool,
}

/// Inference throughput and latency percentiles per batch size (the seed's inference bench).
pub fn infer(a: InferBenchArgs) -> anyhow::Result<()> {
    let device = device_of(a.device)?;
    let vs = VarStore::new(device);
    let memory_format = if device.is_cuda() { MemoryFormat::ChannelsLast } else { MemoryFormat::Contiguous };
    let model = a.arch.build(&vs.root(), 1000, &ModelConfig { memory_format, ..ModelConfig::default() })?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let _guard = tch::no_grad_guard();
    let kind = if a.amp { Kind::Half } else { Kind::Float };
    let mut rows = Vec::new();
    for &b in &a.batch_sizes {
        if b < 1 {
            bail!("--batch-sizes must be at least 1");
        }
        let x = Tensor::randn([b, 3, a.image_size, a.image_size], (kind, device));
        let mut lat = Vec::with_capacity(a.iters);
        for i in 0..a.warmup + a.iters {
            let t = Instant::now();
            let y = tch::autocast(a.amp, || model.forward_t(&x, false));
            let _ = y.sum(Kind::Float).double_value(&[]); // waits for the device
            if i >= a.warmup {
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        let mean = lat.iter().sum::<f64>() / lat.len() as f64;
        rows.push(json!({"batch_size": b, "images_per_s": b as f64 / (mean / 1e3),
            "latency_ms": {"mean": mean, "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}}));
    }
    let doc = json!({"bench": "infer", "machine": machine(), "arch": a.arch.name(), "amp": a.amp,
        "image_size": a.image_size, "device": format!("{device:?}"), "iters": a.iters, "results": rows});
    print(&doc, a.json, || {
        println!("infer {} {:?}{}", a.arch.name(), device, if a.amp { " amp" } else { "" });
        for r in &rows {
            println!("  batch {:>4}: {:>8.0} images/s  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms", r["batch_size"],
                r["images_per_s"].as_f64().unwrap_or(0.0), r["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
                r["latency_ms"]["p90"].as_f64().unwrap_or(0.0), r["latency_ms"]["p99"].as_f64().unwrap_or(0.0));
        }
    })
}
