//! `convnets bench train`, `bench e2e` and `bench infer`: compute-only training steps,
//! loader + model together with a verdict on which one limits, and inference latency.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use convnets_models::resnet::ResNet;
use convnets_models::{Arch, MemoryFormat, ModelConfig};
use convnets_pipeline::cpu::augment::{Layout, OutputDtype};
use convnets_pipeline::loader::{Backend, Loader, LoaderState};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::bench::{machine, LoaderKind};
use crate::device_arg::{device_of, DeviceArg};
use crate::gpu_loader_args::GpuLoaderArgs;
use crate::memory::ImageBatches;
use crate::source::open_split;
use crate::train::scaler::LossScaler;
use crate::train::sgd::Sgd;
use crate::train::step::{synthetic_batch, HostBatchRelease, StepInput, StepOptions, TrainStep};
use convnets_pipeline::loader::{Crops, LoaderConfig};

/// One batch of `batch` images of `size` x `size` (fp16 with `amp`), for the memory check.
fn image_batch(batch: usize, size: i64, amp: bool) -> anyhow::Result<ImageBatches> {
    Ok(ImageBatches {
        batch,
        size: u32::try_from(size)
            .map_err(|_| anyhow::anyhow!("--image-size {size} is out of range"))?,
        value_bytes: if amp { 2 } else { 4 },
        batches: 1,
    })
}

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
    /// Replay the step from a CUDA graph (as `train` does by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_graphs: bool,
    #[arg(long)]
    pub json: bool,
}

/// The model and `train`'s training step (the seed's SGD recipe, loss scaling with `amp`).
struct Trainee {
    _vs: VarStore,
    model: ResNet,
    step: TrainStep,
}

impl Trainee {
    fn new(
        arch: Arch,
        classes: i64,
        device: Device,
        amp: bool,
        cuda_graphs: bool,
    ) -> anyhow::Result<Self> {
        let vs = VarStore::new(device);
        let memory_format = MemoryFormat::for_device(device);
        let model = arch.build(
            &vs.root(),
            classes,
            &ModelConfig {
                memory_format,
                ..ModelConfig::default()
            },
        )?;
        if device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let sgd = Sgd::new(&vs, 0.875, 3.0517578125e-05, false)?;
        let opts = StepOptions {
            amp,
            label_smoothing: 0.1,
            train_bn: true,
            cuda_graphs,
            allreduce_kind: Kind::Float,
        };
        let step = TrainStep::new(sgd, &LossScaler::new(amp), opts, device)?;
        Ok(Self {
            _vs: vs,
            model,
            step,
        })
    }

    fn step(&mut self, images: &Tensor, labels: &Tensor) -> anyhow::Result<()> {
        self.step
            .run(&self.model, StepInput::new(images, labels), 0.01, None)
    }

    /// Waits for the queued steps; the mean loss since the last call.
    fn finish(&mut self) -> anyhow::Result<f64> {
        Ok(self.step.readout()?.loss)
    }
}

/// `train`'s training step on synthetic data already on the device.
pub fn train(a: TrainBenchArgs) -> anyhow::Result<()> {
    let device = device_of(a.device)?;
    if a.batch_size < 1 || a.image_size < 1 {
        bail!("--batch-size and --image-size must be at least 1");
    }
    image_batch(a.batch_size as usize, a.image_size, a.amp)?
        .check(device, "one batch of images on the model's device")?;
    let mut trainee = Trainee::new(a.arch, 1000, device, a.amp, a.cuda_graphs)?;
    let (images, labels) = synthetic_batch(a.batch_size, a.image_size, 1000, device, a.amp)?;
    for _ in 0..a.warmup_steps {
        trainee.step(&images, &labels)?;
    }
    trainee.finish()?;
    let start = Instant::now();
    for _ in 0..a.steps {
        trainee.step(&images, &labels)?;
    }
    let last_loss = trainee.finish()?;
    let seconds = start.elapsed().as_secs_f64();
    let images_per_s = (a.batch_size as usize * a.steps) as f64 / seconds;
    let doc = json!({"bench": "train", "machine": machine(), "arch": a.arch.name(), "batch_size": a.batch_size,
        "amp": a.amp, "image_size": a.image_size, "device": format!("{device:?}"), "steps": a.steps,
        "cuda_graphs": trainee.step.graphed(), "cuda_graphs_off_because": trainee.step.graph_note(),
        "seconds": seconds, "images_per_s": images_per_s, "mean_loss": last_loss});
    print(&doc, a.json, || {
        println!(
            "train {} batch {} {:?}{}: {:.0} images/s",
            a.arch.name(),
            a.batch_size,
            device,
            if a.amp { " amp" } else { "" },
            images_per_s
        )
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
    /// Time the end-to-end part over this many whole epochs instead of --steps, as `train`
    /// reports them: the first epoch is warm-up, the figure is the mean img/s of the
    /// others, each over its wall time with the epoch boundary included (0: use --steps).
    #[arg(long, default_value_t = 0)]
    pub epochs: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Replay the step from a CUDA graph (as `train` does by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_graphs: bool,
    #[arg(long)]
    pub json: bool,
}

/// Loader and model together: images/s, the share of step time spent waiting for data,
/// and, from a loader-only and a model-only run of the same settings, which one limits.
pub fn e2e(a: E2eBenchArgs) -> anyhow::Result<()> {
    let source = open_split(&a.data, "train", 1)?;
    let doc = e2e_measure(source, &a)?;
    print(&doc, a.json, || {
        println!(
            "e2e {} batch {}: {:.0} images/s, waiting for data {:.1} % of the time",
            a.arch.name(),
            a.batch_size,
            doc["images_per_s"].as_f64().unwrap_or(0.0),
            doc["data_wait_fraction"].as_f64().unwrap_or(0.0) * 100.0
        );
        println!("{}", doc["verdict"].as_str().unwrap_or_default());
    })
}

/// The measurement behind `bench e2e`, on any record source (`a.data` is not used).
pub fn e2e_measure(
    source: std::sync::Arc<dyn convnets_formats::RecordSource>,
    a: &E2eBenchArgs,
) -> anyhow::Result<serde_json::Value> {
    let device = device_of(a.device)?;
    let gpu = a.loader == LoaderKind::Gpu;
    if gpu && !device.is_cuda() {
        convnets_pipeline::device::gpus()?;
        bail!("--loader gpu needs a GPU (--device cuda or auto)");
    }
    let mut cfg = LoaderConfig::preset(
        Crops::Train,
        a.batch_size,
        a.image_size,
        if a.amp {
            OutputDtype::F16
        } else {
            OutputDtype::F32
        },
        if device.is_cuda() {
            Layout::Nhwc
        } else {
            Layout::Nchw
        },
    );
    cfg.backend = if gpu {
        // The JPEG engines' share `train` uses, since this is the training case.
        let mut options = a.gpu.options(0);
        let threads = if a.threads > 0 {
            a.threads
        } else {
            convnets_pipeline::loader::core_share(1)
        };
        options.hardware_share = options
            .hardware_share
            .or(Some(crate::train::training_hardware_share(threads, a.arch)));
        Backend::Gpu(options)
    } else {
        Backend::Cpu
    };
    cfg.threads = a.threads;
    cfg.pin_memory = (device.is_cuda() && !gpu).then_some(device);
    crate::memory::check_loader(&cfg, device)?;
    image_batch(a.batch_size, i64::from(a.image_size), a.amp)?
        .check(device, "one batch of images on the model's device")?;
    let total = a.warmup_steps + a.steps;

    // 1. The loader alone; the batches it prefetched before the clock started are not
    // counted.
    let mut loader = Loader::new(source.clone(), cfg.clone(), LoaderState::default())?;
    let drain = a.warmup_steps + cfg.prefetch + 2;
    let loader_img_s = timed(
        drain + a.steps,
        drain,
        || Ok(()),
        || Ok(next(&mut loader)?.len() as u64),
    )?;
    drop(loader);

    // 2. The model alone on one batch kept on the device; 3. both together. Both through
    // `train`'s step (replayed from a CUDA graph where it can be).
    let trainee =
        std::cell::RefCell::new(Trainee::new(a.arch, 1000, device, a.amp, a.cuda_graphs)?);
    let kind = if a.amp { Kind::Half } else { Kind::Float };
    let mut loader = Loader::new(source, cfg, LoaderState::default())?;
    let sample = next(&mut loader)?;
    let images = sample.images.f_to_device(device)?.f_to_kind(kind)?;
    let labels = sample.labels.f_to_device(device)?;
    drop(sample);
    let model_img_s = timed(
        total,
        a.warmup_steps,
        || trainee.borrow_mut().finish().map(|_| ()),
        || {
            trainee.borrow_mut().step(&images, &labels)?;
            Ok(a.batch_size as u64)
        },
    )?;

    let (e2e_img_s, wait_fraction, epoch_img_s) = if a.epochs > 0 {
        let epochs = whole_epochs(&mut loader, &trainee, device, kind, a.epochs)?;
        let measured = &epochs[1..];
        let mean = measured.iter().map(|e| e.images_per_s).sum::<f64>() / measured.len() as f64;
        let wait = measured.iter().map(|e| e.waited_s).sum::<f64>()
            / measured.iter().map(|e| e.seconds).sum::<f64>();
        (
            mean,
            wait,
            Some(epochs.iter().map(|e| e.images_per_s).collect::<Vec<_>>()),
        )
    } else {
        let mut waited = 0.0;
        let mut measuring = false;
        let mut k = 0;
        let mut held = HostBatchRelease::default();
        let img_s = timed(
            total,
            a.warmup_steps,
            || trainee.borrow_mut().finish().map(|_| ()),
            || {
                measuring = k >= a.warmup_steps;
                k += 1;
                let t = Instant::now();
                let batch = next(&mut loader)?;
                if measuring {
                    waited += t.elapsed().as_secs_f64();
                }
                let n = batch.len() as u64;
                feed(&trainee, &mut held, batch, device, kind)?;
                Ok(n)
            },
        )?;
        let measured_s = a.steps as f64 * a.batch_size as f64 / img_s;
        (img_s, waited / measured_s, None)
    };
    let input_bound = loader_img_s < model_img_s;
    let verdict = if input_bound {
        format!("input-bound: the loader delivers {loader_img_s:.0} img/s, the model consumes {model_img_s:.0} img/s; try --loader gpu, more --threads, or pack with --max-side")
    } else {
        format!("compute-bound: the loader delivers {loader_img_s:.0} img/s, the model consumes {model_img_s:.0} img/s; the input pipeline keeps up")
    };
    Ok(
        json!({"bench": "e2e", "machine": machine(), "arch": a.arch.name(), "batch_size": a.batch_size,
        "image_size": a.image_size, "amp": a.amp, "device": format!("{device:?}"), "loader": if gpu { "gpu" } else { "cpu" },
        "loader_threads": a.threads, "steps": a.steps, "epochs": a.epochs, "cuda_graphs": trainee.borrow().step.graphed(),
        "images_per_s": e2e_img_s, "epoch_images_per_s": epoch_img_s, "loader_only_images_per_s": loader_img_s, "model_only_images_per_s": model_img_s,
        "data_wait_fraction": wait_fraction, "input_bound": input_bound, "verdict": verdict}),
    )
}

/// One batch into the training step: copied to the device (no wait for a GPU batch), the
/// host batch held until the step that reads it has run.
fn feed(
    trainee: &std::cell::RefCell<Trainee>,
    held: &mut HostBatchRelease<convnets_pipeline::loader::Batch>,
    batch: convnets_pipeline::loader::Batch,
    device: Device,
    kind: Kind,
) -> anyhow::Result<()> {
    let images = batch.images.f_to_device_(device, kind, true, false)?;
    let labels = batch
        .labels
        .f_to_device_(device, Kind::Int64, true, false)?;
    trainee.borrow_mut().step(&images, &labels)?;
    held.hold(batch, device)?;
    Ok(())
}

/// One epoch of `bench e2e --epochs`.
struct EpochTime {
    images_per_s: f64,
    seconds: f64,
    /// Time spent waiting for the loader.
    waited_s: f64,
}

/// Trains `epochs` whole epochs from `loader` (which may already be inside the first);
/// each epoch's images over its wall time, from the end of the previous one (so the turn
/// to the next epoch counts) to its last step done on the device.
fn whole_epochs(
    loader: &mut Loader,
    trainee: &std::cell::RefCell<Trainee>,
    device: Device,
    kind: Kind,
    epochs: usize,
) -> anyhow::Result<Vec<EpochTime>> {
    if epochs < 2 {
        bail!("--epochs {epochs}: needs 2 or more (the first is warm-up)");
    }
    let mut held = HostBatchRelease::default();
    let mut out = Vec::with_capacity(epochs);
    trainee.borrow_mut().finish()?;
    let mut start = Instant::now();
    for _ in 0..epochs {
        let (mut images, mut waited_s) = (0u64, 0.0);
        loop {
            let t = Instant::now();
            let Some(batch) = loader.next_batch() else {
                break;
            };
            let batch = batch?;
            waited_s += t.elapsed().as_secs_f64();
            images += batch.len() as u64;
            feed(trainee, &mut held, batch, device, kind)?;
        }
        trainee.borrow_mut().finish()?;
        let seconds = start.elapsed().as_secs_f64();
        start = Instant::now();
        out.push(EpochTime {
            images_per_s: images as f64 / seconds,
            seconds,
            waited_s,
        });
    }
    Ok(out)
}

fn next(loader: &mut Loader) -> anyhow::Result<convnets_pipeline::loader::Batch> {
    loop {
        if let Some(b) = loader.next_batch() {
            return Ok(b?);
        }
    }
}

/// Runs `f` `total` times; images/s over the runs after the first `warmup`. `sync` waits
/// for queued device work, at both ends of the timed runs.
fn timed(
    total: usize,
    warmup: usize,
    mut sync: impl FnMut() -> anyhow::Result<()>,
    mut f: impl FnMut() -> anyhow::Result<u64>,
) -> anyhow::Result<f64> {
    let mut images = 0;
    let mut start = Instant::now();
    for i in 0..total {
        if i == warmup {
            sync()?;
            start = Instant::now();
            images = 0;
        }
        images += f()?;
    }
    sync()?;
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
    /// Replay the forward pass from a CUDA graph (GPU).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_graphs: bool,
    #[arg(long)]
    pub json: bool,
}

/// Waits for the device's queued work.
fn sync(device: Device) -> anyhow::Result<()> {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    Ok(())
}

/// An inference forward pass on a fixed input, eager or replayed from a CUDA graph
/// captured after `warmup` eager passes (cuDNN autotuning).
struct Forward<'a> {
    model: &'a ResNet,
    x: &'a Tensor,
    amp: bool,
    #[cfg(feature = "cuda")]
    graph: Option<(crate::torch_ext::cuda::CudaGraph, Tensor)>,
}

impl<'a> Forward<'a> {
    fn new(
        model: &'a ResNet,
        x: &'a Tensor,
        amp: bool,
        graph: bool,
        warmup: usize,
    ) -> anyhow::Result<Self> {
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let mut f = Self {
            model,
            x,
            amp,
            #[cfg(feature = "cuda")]
            graph: None,
        };
        for _ in 0..warmup.max(1) {
            let _ = f.eager()?;
        }
        sync(x.device())?;
        #[cfg(feature = "cuda")]
        if let (true, Device::Cuda(i)) = (graph, x.device()) {
            let (g, y) = crate::torch_ext::cuda::CudaGraph::capture(i, || f.eager())?;
            f.graph = Some((g, y));
        }
        let _ = graph;
        Ok(f)
    }

    fn eager(&self) -> anyhow::Result<Tensor> {
        Ok(tch::autocast(self.amp, || {
            self.model.f_forward_t(self.x, false)
        })?)
    }

    fn run(&mut self) -> anyhow::Result<()> {
        #[cfg(feature = "cuda")]
        if let Some((g, _)) = &mut self.graph {
            return g.replay();
        }
        self.eager().map(|_| ())
    }

    fn graphed(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.graph.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }
}

/// Inference throughput and latency percentiles per batch size (the seed's inference bench).
pub fn infer(a: InferBenchArgs) -> anyhow::Result<()> {
    let device = device_of(a.device)?;
    let vs = VarStore::new(device);
    let memory_format = MemoryFormat::for_device(device);
    let model = a.arch.build(
        &vs.root(),
        1000,
        &ModelConfig {
            memory_format,
            ..ModelConfig::default()
        },
    )?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let _guard = tch::no_grad_guard();
    let kind = if a.amp { Kind::Half } else { Kind::Float };
    let mut rows = Vec::new();
    for &b in &a.batch_sizes {
        if b < 1 || a.image_size < 1 {
            bail!("--batch-sizes and --image-size must be at least 1");
        }
        image_batch(b as usize, a.image_size, a.amp)?
            .check(device, "one batch of images on the model's device")?;
        let x = Tensor::f_randn([b, 3, a.image_size, a.image_size], (kind, device))?;
        let x = if device.is_cuda() {
            convnets_models::layout::to_channels_last(&x)?
        } else {
            x
        };
        let mut forward = Forward::new(
            &model,
            &x,
            a.amp,
            a.cuda_graphs && device.is_cuda(),
            a.warmup,
        )?;
        let mut lat = Vec::with_capacity(a.iters);
        for _ in 0..a.iters {
            let t = Instant::now();
            forward.run()?;
            sync(device)?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        let mean = lat.iter().sum::<f64>() / lat.len() as f64;
        rows.push(json!({"batch_size": b, "images_per_s": b as f64 / (mean / 1e3), "cuda_graph": forward.graphed(),
            "latency_ms": {"mean": mean, "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}}));
    }
    let doc = json!({"bench": "infer", "machine": machine(), "arch": a.arch.name(), "amp": a.amp,
        "image_size": a.image_size, "device": format!("{device:?}"), "iters": a.iters, "results": rows});
    print(&doc, a.json, || {
        println!(
            "infer {} {:?}{}",
            a.arch.name(),
            device,
            if a.amp { " amp" } else { "" }
        );
        for r in &rows {
            println!(
                "  batch {:>4}: {:>8.0} images/s  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms",
                r["batch_size"],
                r["images_per_s"].as_f64().unwrap_or(0.0),
                r["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
                r["latency_ms"]["p90"].as_f64().unwrap_or(0.0),
                r["latency_ms"]["p99"].as_f64().unwrap_or(0.0)
            );
        }
    })
}
