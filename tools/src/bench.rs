//! `convnets bench`: throughput figures as a table or one JSON document.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use convnets_pipeline::cpu::augment::{Layout, OutputDtype};
use convnets_pipeline::loader::{Backend, Loader, LoaderConfig, LoaderState, LoaderStats};
use convnets_pipeline::sampler::LastBatch;
use serde_json::json;

use crate::gpu_loader_args::GpuLoaderArgs;
use crate::page_cache;
use crate::source::open_split;
use crate::train::OnBadRecord;
use convnets_pipeline::loader::Crops;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Loader-only throughput: how fast batches come out, nothing consumes them.
    Loader(LoaderBenchArgs),
    /// Compute-only: forward + backward + optimizer on synthetic data on the device.
    Train(crate::bench_model::TrainBenchArgs),
    /// Loader and model together, with a verdict on which one limits.
    E2e(crate::bench_model::E2eBenchArgs),
    /// Inference throughput and latency percentiles per batch size.
    Infer(crate::bench_model::InferBenchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoaderKind {
    Cpu,
    Gpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    U8,
    F16,
    Bf16,
    F32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    Nchw,
    Nhwc,
}

#[derive(Debug, Args)]
pub struct LoaderBenchArgs {
    /// Dataset folder (made by pack-imagenet), or a folder of ImageNet TFRecords.
    #[arg(long)]
    pub data: PathBuf,
    /// Subtracted from TFRecord labels (build_imagenet_data.py labels start at 1).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub label_offset: i64,
    #[arg(long, default_value = "train")]
    pub split: String,
    #[arg(long, value_enum, default_value_t = LoaderKind::Cpu)]
    pub loader: LoaderKind,
    #[command(flatten)]
    pub gpu: GpuLoaderArgs,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Decode threads (0: one per core); with --loader gpu, for what the hardware decoder
    /// does not take.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    #[arg(long, value_enum, default_value_t = LayoutArg::Nchw)]
    pub layout: LayoutArg,
    /// Evaluation transform (resize + centre crop) instead of the training one.
    #[arg(long)]
    pub eval: bool,
    /// Batches excluded from the figures while caches and threads warm up.
    #[arg(long, default_value_t = 5)]
    pub warmup_batches: usize,
    /// Stop after this many epochs...
    #[arg(long)]
    pub epochs: Option<u64>,
    /// ...or after this many seconds (default 20 when --epochs is not given).
    #[arg(long)]
    pub seconds: Option<f64>,
    #[arg(long, default_value_t = 2)]
    pub prefetch: usize,
    /// What a record that fails to decode does: fail the run, or be skipped and counted.
    #[arg(long, value_enum, default_value_t = OnBadRecord::Error)]
    pub on_bad_record: OnBadRecord,
    /// Evict the split's files from the page cache first (posix_fadvise DONTNEED; no root
    /// needed), so the run reads them from the disk.
    #[arg(long)]
    pub drop_cache: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Loader(a) => loader(a),
        BenchCommand::Train(a) => crate::bench_model::train(a),
        BenchCommand::E2e(a) => crate::bench_model::e2e(a),
        BenchCommand::Infer(a) => crate::bench_model::infer(a),
    }
}

fn loader(a: LoaderBenchArgs) -> anyhow::Result<()> {
    // 1. The split (evicted from the page cache first with --drop-cache) and the loader.
    let gpu = a.loader == LoaderKind::Gpu;
    if gpu {
        // A clear "built without CUDA" / "no GPU" before anything else.
        convnets_pipeline::device::gpus()?;
    }
    let limit = match (a.epochs, a.seconds) {
        (Some(_), Some(_)) => bail!("give --epochs or --seconds, not both"),
        (Some(e), None) => Limit::Epochs(e),
        (None, s) => Limit::Time(Duration::from_secs_f64(s.unwrap_or(20.0))),
    };
    let cfg = loader_bench_config(&a);
    crate::memory::check_loader(&cfg, tch::Device::Cuda(0))?;
    // Before the split is opened: pages under a live mapping are not evicted.
    let evicted = a
        .drop_cache
        .then(|| page_cache::evict_split(&a.data, &a.split))
        .transpose()?;
    let split = open_split(&a.data, &a.split, a.label_offset)?;
    let records = split.len();
    // What opening read back in (index pages; a TFRecord folder is read through to index it).
    let drop_cache = evicted.map(|(files, e)| (page_cache::resident_bytes(&files), e));
    let mut loader = Loader::new(split, cfg, LoaderState::default())
        .with_context(|| format!("starting the loader on {}", a.data.display()))?;
    // 2. Batches until the limit, the warm-up ones not counted.
    let measured = measure(&mut loader, &a, limit)?;
    if measured.batches == 0 {
        bail!(
            "no batches measured: the run ended within the {} warm-up batches (dataset of {records} records)",
            a.warmup_batches
        );
    }
    // 3. The figures, as JSON or a table.
    report(&a, &mut loader, records, &measured, drop_cache.as_ref())
}

/// What the measured window of `bench loader` saw.
struct Measured {
    images: u64,
    batches: u64,
    wall: f64,
    /// The loader's counters when the window opened.
    base: LoaderStats,
}

/// Takes batches until `limit` (nothing consumes them); the first `--warmup-batches` are
/// not counted.
fn measure(loader: &mut Loader, a: &LoaderBenchArgs, limit: Limit) -> anyhow::Result<Measured> {
    let gpu = a.loader == LoaderKind::Gpu;
    let mut measured_images = 0u64;
    let mut measured_batches = 0u64;
    let mut seen = 0usize;
    let mut start = Instant::now();
    let mut base = loader.stats();
    let mut epochs_done = 0u64;
    loop {
        let Some(batch) = loader.next_batch() else {
            epochs_done += 1;
            if matches!(limit, Limit::Epochs(e) if epochs_done >= e) {
                break;
            }
            continue;
        };
        let batch = batch?;
        seen += 1;
        if seen == a.warmup_batches {
            start = Instant::now();
            base = loader.stats();
        } else if seen > a.warmup_batches {
            measured_images += batch.len() as u64;
            measured_batches += 1;
        }
        drop(batch);
        if let Limit::Time(t) = limit {
            if gpu && seen > a.warmup_batches && start.elapsed() >= t {
                // Count only batches the GPU has finished.
                tch::Cuda::synchronize(0);
            }
            if seen > a.warmup_batches && start.elapsed() >= t {
                break;
            }
        }
    }
    if gpu {
        tch::Cuda::synchronize(0);
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(Measured {
        images: measured_images,
        batches: measured_batches,
        wall,
        base,
    })
}

/// Prints what `bench loader` measured.
fn report(
    a: &LoaderBenchArgs,
    loader: &mut Loader,
    records: usize,
    m: &Measured,
    drop_cache: Option<&(Option<u64>, page_cache::Eviction)>,
) -> anyhow::Result<()> {
    let gpu = a.loader == LoaderKind::Gpu;
    let (measured_images, wall, base) = (m.images, m.wall, &m.base);
    let measured_batches = m.batches;
    let stats = loader.stats();
    let skipped_records = loader.take_skipped();
    let d = |x: f64, y: f64| x - y;
    let img_s = measured_images as f64 / wall;
    let mb_s = (stats.bytes_read - base.bytes_read) as f64 / wall / 1e6;
    let doc = json!({
        "bench": "loader",
        "machine": machine(),
        "version": env!("CARGO_PKG_VERSION"),
        "settings": {
            "data": a.data, "split": a.split, "records": records,
            "loader": if gpu { "gpu" } else { "cpu" },
            "gpu": gpu.then_some(a.gpu),
            "batch_size": a.batch_size, "threads": stats.threads, "image_size": a.image_size,
            "dtype": format!("{:?}", a.dtype).to_lowercase(),
            "layout": format!("{:?}", a.layout).to_lowercase(),
            "transform": if a.eval { "eval" } else { "train" },
            "prefetch": a.prefetch, "warmup_batches": a.warmup_batches, "drop_cache": a.drop_cache,
        },
        // True only when --drop-cache evicted every file of the split.
        "cold": drop_cache.as_ref().is_some_and(|(_, e)| e.cold()),
        "drop_cache": drop_cache.as_ref().map(|(at_start, e)| e.to_json(*at_start)),
        "images": measured_images,
        "batches": measured_batches,
        "wall_s": wall,
        "images_per_s": img_s,
        "encoded_mb_per_s": mb_s,
        // Thread-seconds per stage over the measured window, summed over workers.
        "stage_thread_s": {
            "read": d(stats.read_s, base.read_s),
            "decode": d(stats.decode_s, base.decode_s),
            "augment": d(stats.augment_s, base.augment_s),
        },
        // GPU-seconds of the fused augment kernel (GPU loader).
        "augment_gpu_s": d(stats.augment_gpu_s, base.augment_gpu_s),
        "hardware_decode_thread_s": d(stats.hardware_decode_s, base.hardware_decode_s),
        "consumer_wait_s": d(stats.wait_s, base.wait_s),
        "mean_ready_batches": stats.mean_ready_batches,
        "decoder_split": {
            "cpu": stats.decoded_cpu - base.decoded_cpu,
            "hardware": stats.decoded_hardware - base.decoded_hardware,
            "hardware_batch_failures": stats.hardware_batch_failures,
        },
        "gpu_memory": gpu.then(|| json!({
            // The loader's own buffers (arenas, parameters, output batches in flight).
            "loader_buffers_mib": stats.gpu_buffer_bytes as f64 / 1048576.0,
            // Everything in use on the GPU (nvJPEG's buffers and libtorch's cache included).
            "device_in_use_mib": convnets_pipeline::device::memory_in_use(0).ok().map(|b| b as f64 / 1048576.0),
        })),
        "skipped": stats.skipped,
        "skipped_records": skipped_records,
        "peak_rss_mib": peak_rss_mib(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "loader {}  {} threads  batch {}  {}x{} {:?} {:?}",
            if gpu { "gpu" } else { "cpu" },
            stats.threads,
            a.batch_size,
            a.image_size,
            a.image_size,
            a.dtype,
            a.layout
        );
        println!(
            "  {:>10.0} images/s   {:>8.1} MB/s encoded   {} images in {:.1} s",
            img_s, mb_s, measured_images, wall
        );
        println!(
            "  thread-s: read {:.2}  decode {:.2}  augment {:.2}   consumer waited {:.2} s   ready queue {:.1}",
            d(stats.read_s, base.read_s),
            d(stats.decode_s, base.decode_s),
            d(stats.augment_s, base.augment_s),
            d(stats.wait_s, base.wait_s),
            stats.mean_ready_batches
        );
        println!(
            "  decoded: {} on the hardware decoder, {} on CPU threads",
            stats.decoded_hardware - base.decoded_hardware,
            stats.decoded_cpu - base.decoded_cpu
        );
        if gpu {
            println!(
                "  GPU memory: loader buffers {:.0} MiB",
                stats.gpu_buffer_bytes as f64 / 1048576.0
            );
        }
        if let Some((at_start, e)) = &drop_cache {
            println!("  {}", page_cache::describe(e, *at_start));
        }
    }
    Ok(())
}

/// The loader `bench loader` measures: full batches only, also for the eval transform.
fn loader_bench_config(a: &LoaderBenchArgs) -> LoaderConfig {
    let crops = if a.eval { Crops::Eval } else { Crops::Train };
    let dtype = match a.dtype {
        DtypeArg::U8 => OutputDtype::U8,
        DtypeArg::F16 => OutputDtype::F16,
        DtypeArg::Bf16 => OutputDtype::Bf16,
        DtypeArg::F32 => OutputDtype::F32,
    };
    let layout = match a.layout {
        LayoutArg::Nchw => Layout::Nchw,
        LayoutArg::Nhwc => Layout::Nhwc,
    };
    let mut cfg = LoaderConfig::preset(crops, a.batch_size, a.image_size, dtype, layout);
    cfg.backend = match a.loader {
        LoaderKind::Gpu => Backend::Gpu(a.gpu.options(0)),
        LoaderKind::Cpu => Backend::Cpu,
    };
    cfg.sampler.last_batch = LastBatch::Drop;
    cfg.threads = a.threads;
    cfg.prefetch = a.prefetch;
    cfg.on_bad_record = a.on_bad_record.into();
    cfg
}

enum Limit {
    Epochs(u64),
    Time(Duration),
}

/// Cores and CPU model, so figures from different machines are not mixed up.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu": cpu,
        "arch": std::env::consts::ARCH,
    })
}

/// Peak resident memory of this process (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
