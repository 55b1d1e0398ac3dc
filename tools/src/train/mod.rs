//! `convnets train` and `convnets eval`: the seed's recipe (SGD momentum 0.875, weight decay
//! 3.0517578125e-05 without BN/bias, label smoothing 0.1, LR 0.256 per 256 images with
//! warm-up then cosine), fp16 autocast with dynamic loss scaling on GPU, checkpoints every
//! epoch with exact resume, evaluation on the val split, DLLogger-style JSON logs.
//! Fine-tuning: `--init-from`, `--freeze-backbone`, `--backbone-lr-scale` (finetune.rs).

pub mod distributed;
pub mod finetune;
pub mod log;
pub mod recipes;
mod run_dir;
pub mod scaler;
pub mod schedule;
pub mod sgd;
pub mod step;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use convnets_formats::RecordSource;
use convnets_models::{Arch, MemoryFormat, ModelConfig};
use convnets_pipeline::cpu::augment::{Layout, OutputDtype};
use convnets_pipeline::loader::{
    Backend, BadRecordPolicy, Batch, Loader, LoaderConfig, LoaderState,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use log::LogRecord;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

use crate::checkpoint::{self, CheckpointMeta};
use crate::device_arg::{device_of, DeviceArg};
use crate::gpu_loader_args::GpuLoaderArgs;
use crate::memory;
use crate::source::open_split;
use convnets_pipeline::loader::Crops;
use run_dir::RunDir;
use scaler::LossScaler;
use schedule::{LrSchedule, ScheduleKind};
use sgd::Sgd;
use step::{HostBatchRelease, StepInput, StepOptions, TrainStep};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum LoaderKind {
    /// The GPU loader when the model trains on a GPU (CUDA build), else the CPU loader;
    /// the run's log and summary say which and why.
    Auto,
    Cpu,
    Gpu,
    /// Random tensors already on the device: compute-only runs.
    Synthetic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum AllReduceDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl AllReduceDtype {
    pub fn kind(self) -> Kind {
        match self {
            Self::F32 => Kind::Float,
            Self::F16 => Kind::Half,
            Self::Bf16 => Kind::BFloat16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum ScheduleArg {
    Cosine,
    Step,
    Linear,
}

/// Everything a run was started with; saved in the run folder so `--resume` continues the
/// same run.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Dataset folder (pack-imagenet output) or ImageNet TFRecord folder.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "resnet50")]
    #[serde(with = "arch_name")]
    pub arch: Arch,
    #[arg(long, value_enum, default_value_t = LoaderKind::Auto)]
    pub loader: LoaderKind,
    #[command(flatten)]
    #[serde(default)]
    pub gpu: GpuLoaderArgs,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// fp16 autocast with dynamic loss scaling (GPU only).
    #[arg(long)]
    pub amp: bool,
    #[arg(long, default_value_t = 90)]
    pub epochs: u64,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Learning rate per 256 images (scaled linearly with the batch size).
    #[arg(long, default_value_t = 0.256)]
    pub lr: f64,
    #[arg(long, default_value_t = 8.0)]
    pub warmup_epochs: f64,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    pub lr_schedule: ScheduleArg,
    /// Epochs at which the step schedule multiplies the LR by 0.1.
    #[arg(long, value_delimiter = ',', default_values_t = [30.0, 60.0, 80.0])]
    pub lr_steps: Vec<f64>,
    #[arg(long, default_value_t = 0.875)]
    pub momentum: f64,
    #[arg(long, default_value_t = 3.0517578125e-05)]
    pub weight_decay: f64,
    #[arg(long)]
    pub nesterov: bool,
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Mixup alpha (0: off): each batch is blended with a shuffled copy of itself with a
    /// weight drawn from Beta(alpha, alpha), and so are the losses of both label sets.
    #[arg(long, default_value_t = 0.0)]
    pub mixup: f64,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.9999);
    /// evaluation then uses the averaged weights.
    #[arg(long)]
    pub ema: Option<f64>,
    /// A named recipe of the seed (`convnets train --recipe list` lists them); flags given
    /// on the command line override it.
    #[arg(long)]
    pub recipe: Option<String>,
    /// A TOML file of flag values (e.g. `epochs = 90`, `lr-schedule = "cosine"`); flags on
    /// the command line override it.
    #[arg(long)]
    pub recipe_file: Option<PathBuf>,
    /// Loader threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate on the val split every N epochs (0: never).
    #[arg(long, default_value_t = 1)]
    pub eval_every: u64,
    /// One JSON log line every N steps.
    #[arg(long, default_value_t = 50)]
    pub log_every: u64,
    /// Checkpoints kept besides the best one.
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// What a record that fails to decode does.
    #[arg(long, value_enum, default_value_t = OnBadRecord::Error)]
    pub on_bad_record: OnBadRecord,
    /// Stop after this many steps in total (for short runs and tests).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Start from these weights: a checkpoint or run folder, or a safetensors state_dict
    /// with torchvision/timm names. A classifier (fc) of another class count than the
    /// dataset's is not loaded but initialised afresh; any other mismatch is an error.
    #[arg(long)]
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Train the classifier (fc.*) only: the backbone's parameters are frozen and its BN
    /// layers run in eval mode, so their running statistics do not change either.
    #[arg(long)]
    #[serde(default)]
    pub freeze_backbone: bool,
    /// The backbone's LR as a multiple of the LR (the classifier keeps the full LR).
    #[arg(long, default_value_t = 1.0)]
    #[serde(default = "one")]
    pub backbone_lr_scale: f64,
    /// Train on this many local GPUs, one process each (data parallel over NCCL;
    /// --batch-size is per GPU). Under torchrun, SLURM or mpirun the group comes from the
    /// environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) instead.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "one_usize")]
    pub gpus: usize,
    /// The dtype gradients travel in between ranks. f16 and bf16 halve the traffic (like
    /// DDP's fp16/bf16 compression hooks): each rank divides by the number of ranks first,
    /// so the sum stays in range; the optimizer still steps in fp32.
    #[arg(long, value_enum, default_value_t = AllReduceDtype::F32)]
    #[serde(default)]
    pub allreduce_dtype: AllReduceDtype,
    /// Start each residual block as the identity: the last BN of its branch gets gamma 0
    /// (Goyal et al. 2017; the seed's and timm's choice, not torchvision's default). It
    /// slows the first epochs, so for short runs and fine-tuning `false` may learn faster.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    #[serde(default = "yes")]
    pub zero_init_residual: bool,
    /// Capture the training step as a CUDA graph and replay it (GPU, fixed batch shape, no
    /// mixup); `--cuda-graphs false` runs every step eagerly.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    #[serde(default = "yes")]
    pub cuda_graphs: bool,
    /// Run folder: log.jsonl, summary.json, checkpoints/.
    #[arg(long, short)]
    pub output: PathBuf,
}

/// Serde default of `backbone_lr_scale` (runs saved before it existed).
fn one() -> f64 {
    1.0
}

/// Serde default of `cuda_graphs` (runs saved before it existed).
fn yes() -> bool {
    true
}

/// Serde default of `gpus` and `TrainState::world_size`.
fn one_usize() -> usize {
    1
}

/// `Arch` in JSON as its `--arch` name.
mod arch_name {
    use convnets_models::Arch;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(arch: &Arch, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(arch.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arch, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum OnBadRecord {
    Error,
    Skip,
}

impl From<OnBadRecord> for BadRecordPolicy {
    fn from(o: OnBadRecord) -> Self {
        match o {
            OnBadRecord::Error => BadRecordPolicy::Error,
            OnBadRecord::Skip => BadRecordPolicy::Skip,
        }
    }
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct TrainCommand {
    #[command(flatten)]
    pub args: TrainArgs,
    /// Continue the run in --output from its last checkpoint (other flags are taken from it).
    #[arg(long)]
    pub resume: bool,
}

/// What a checkpoint remembers besides weights and momentum.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub epoch: u64,
    pub step: u64,
    pub loader: LoaderState,
    pub scaler: LossScaler,
    pub best_top1: Option<f64>,
    /// The step of the checkpoint with `best_top1`, which `checkpoints/best` points at.
    #[serde(default)]
    pub best_step: Option<u64>,
    /// Ranks of the run that saved this (the loader position counts batches per rank).
    #[serde(default = "one_usize")]
    pub world_size: usize,
}

impl TrainState {
    /// The state of a run that has not taken a step.
    fn new(amp: bool, world_size: usize) -> Self {
        Self {
            epoch: 0,
            step: 0,
            loader: LoaderState::default(),
            scaler: LossScaler::new(amp),
            best_top1: None,
            best_step: None,
            world_size,
        }
    }
}

/// A one-process run stopped by Ctrl-C, its checkpoint saved: the process exits with 130,
/// the shell's code for SIGINT (`main_with`).
#[derive(Debug)]
pub struct Interrupted {
    pub step: u64,
    pub checkpoint: Option<PathBuf>,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted at step {}", self.step)?;
        match &self.checkpoint {
            Some(dir) => write!(
                f,
                "; checkpoint {} saved, continue with --resume",
                dir.display()
            ),
            None => write!(f, "; no checkpoint saved"),
        }
    }
}

impl std::error::Error for Interrupted {}

/// Set by Ctrl-C: the loop saves a checkpoint at the next step and stops.
static INTERRUPTED: std::sync::LazyLock<Arc<std::sync::atomic::AtomicBool>> =
    std::sync::LazyLock::new(Default::default);

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Ctrl-C sets [`INTERRUPTED`]; a second one exits at once with 130. Installed once per
/// process (tests train several times in one), and only by a process that trains: a
/// launcher forwards signals to its ranks instead (`dist::launch`).
fn catch_ctrl_c() -> anyhow::Result<()> {
    static INSTALLED: std::sync::OnceLock<std::io::Result<()>> = std::sync::OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        use signal_hook::{consts::SIGINT, flag};
        // In this order: the exit only fires when the flag was already set.
        flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&INTERRUPTED))?;
        flag::register(SIGINT, Arc::clone(&INTERRUPTED))?;
        Ok(())
    });
    installed
        .as_ref()
        .map_err(|e| anyhow::anyhow!("installing the Ctrl-C handler: {e}"))?;
    Ok(())
}

pub fn train(cmd: TrainCommand) -> anyhow::Result<()> {
    let env = crate::dist::env::DistEnv::from_env()?;
    if env.is_none() && cmd.args.gpus > 1 {
        // This process becomes the launcher of one process per GPU, which find the group
        // in their environment.
        let gpus = visible_gpus(cmd.args.gpus)?;
        return crate::dist::launch::launch(cmd.args.gpus, &crate::invocation(), Some(gpus));
    }
    catch_ctrl_c()?;
    let dist = match &env {
        Some(env) => {
            if cmd.args.gpus > 1 && cmd.args.gpus != env.world_size {
                bail!(
                    "--gpus {} but the environment has a group of {}",
                    cmd.args.gpus,
                    env.world_size
                );
            }
            // NCCL between GPUs; TCP between processes training on CPUs.
            let gpu = device_of(cmd.args.device)?.is_cuda();
            Some(Arc::new(distributed::Distributed::start(env, gpu)?))
        }
        None => None,
    };
    let result = train_rank(cmd, dist.clone());
    if let Some(d) = dist {
        match &result {
            // What the other ranks print as this rank's reason (an allocation failure
            // names the batch size and device; no C++ stack trace).
            Err(e) => d.report_failure(&crate::error_text(e)),
            Ok(()) => {
                if let Ok(d) = Arc::try_unwrap(d) {
                    d.finish();
                }
            }
        }
    }
    result
}

/// A loader position of a run with `old` ranks for a group of `new`: as many images into
/// the epoch, rounded down to whole batches (the sampler deals batch k of every rank from
/// the same global stretch of the epoch, so that is where the new group goes on).
fn regroup(pos: LoaderState, old: usize, new: usize) -> LoaderState {
    LoaderState {
        epoch: pos.epoch,
        batch: pos.batch * old / new.max(1),
    }
}

/// The GPUs the launcher hands to its `n` ranks: the visible ones, in order.
fn visible_gpus(n: usize) -> anyhow::Result<Vec<String>> {
    let listed: Option<Vec<String>> = std::env::var("CUDA_VISIBLE_DEVICES").ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    let count = tch::Cuda::device_count() as usize;
    if count < n {
        bail!(
            "--gpus {n}: {count} GPU(s) visible{}",
            if cfg!(feature = "cuda") {
                ""
            } else {
                " (built without CUDA)"
            }
        );
    }
    Ok(match listed {
        Some(l) => l.into_iter().take(n).collect(),
        None => (0..n).map(|i| i.to_string()).collect(),
    })
}

/// One rank's run (all of it without a group).
fn train_rank(
    cmd: TrainCommand,
    dist: Option<Arc<distributed::Distributed>>,
) -> anyhow::Result<()> {
    let main = dist.as_ref().is_none_or(|d| d.is_main());
    let run = RunDir::new(&cmd.args.output);
    // Rank 0 holds the run folder until the run ends (a second `train` on it is refused),
    // taken once the request is known to be sound, so a refused one writes nothing.
    let lock = || if main { run.lock().map(Some) } else { Ok(None) };
    let (args, resume, _lock) = if cmd.resume {
        let mut args = run.load_args()?;
        let held = lock()?;
        if main {
            // What a write cut short left (a process killed, a full disk).
            run.tidy(args.keep_last)?;
        }
        // A resumed run keeps its recipe; only the stopping point is taken from this call.
        args.max_steps = cmd.args.max_steps;
        match run.latest()? {
            Some((dir, state)) => (args, Some((dir, state)), held),
            None => {
                eprintln!(
                    "--resume: {} holds no finished checkpoint (the run stopped before its first): \
                     starting it from the beginning with its saved arguments",
                    cmd.args.output.display()
                );
                check_args(&args)?;
                if main {
                    run.restart()?;
                }
                (args, None, held)
            }
        }
    } else {
        check_args(&cmd.args)?;
        if let Some(source) = &cmd.args.init_from {
            finetune::weights_file(source, cmd.args.arch)?;
        }
        let held = lock()?;
        // Rank 0 writes the run folder; the others only read it when resuming.
        if main {
            run.create(&cmd.args)?;
        }
        (cmd.args, None, held)
    };
    let (batch, size) = (args.batch_size, args.image_size);
    let device = rank_device(&args, dist.as_deref())?;
    Trainer::new(args, run, resume, dist)
        .and_then(Trainer::run)
        .map_err(|e| memory::name_allocation_failure(e, batch, size, device))
}

/// The device this rank's model runs on: its GPU in a group of GPU processes, else
/// `--device`'s.
fn rank_device(
    args: &TrainArgs,
    dist: Option<&distributed::Distributed>,
) -> anyhow::Result<Device> {
    Ok(match dist.and_then(|d| d.device) {
        Some(i) => Device::Cuda(i),
        None => device_of(args.device)?,
    })
}

/// Refusals that must come before anything is written to the run folder.
fn check_args(args: &TrainArgs) -> anyhow::Result<()> {
    let device = device_of(args.device)?;
    if args.amp && !device.is_cuda() {
        bail!("--amp needs a GPU (fp16 autocast); drop it to train in fp32 on the CPU");
    }
    if args.batch_size == 0 || args.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    check_hyperparameters(args)?;
    convnets_pipeline::loader::check_threads(args.threads)?;
    if args.image_size == 0 {
        bail!("--image-size must be at least 1");
    }
    // `auto` on a GPU is the GPU loader unless it is unavailable; Trainer::new checks again
    // once the choice is made.
    let loader = match (args.loader, device.is_cuda()) {
        (LoaderKind::Auto, true) => LoaderKind::Gpu,
        (kind, _) => resolve_loader(kind, device).0,
    };
    check_memory(args, device, loader)?;
    if !(args.backbone_lr_scale.is_finite() && args.backbone_lr_scale >= 0.0) {
        bail!(
            "--backbone-lr-scale must be a finite number >= 0, got {}",
            args.backbone_lr_scale
        );
    }
    if args.freeze_backbone && args.backbone_lr_scale != 1.0 {
        bail!("--backbone-lr-scale has no effect with --freeze-backbone (the backbone does not train); drop one");
    }
    match (args.loader, &args.data) {
        (LoaderKind::Cpu, None) => bail!("--loader cpu needs --data DATASET"),
        (LoaderKind::Auto, None) => bail!("--loader auto (the default) needs --data DATASET; --loader synthetic trains on random tensors"),
        (LoaderKind::Gpu, data) => {
            convnets_pipeline::device::gpus()?;
            if !device.is_cuda() {
                bail!("--loader gpu puts batches on the GPU: it needs --device cuda (or auto with a GPU)");
            }
            if data.is_none() {
                bail!("--loader gpu needs --data DATASET");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Refuses batches whose images alone cannot fit where they are kept: the loader's batches
/// (host memory for the CPU loader) and the batch on the model's device.
fn check_memory(args: &TrainArgs, device: Device, loader: LoaderKind) -> anyhow::Result<()> {
    if args.data.is_some() && matches!(loader, LoaderKind::Cpu | LoaderKind::Gpu) {
        let cfg = loader_config(args, device, loader, &Placement::default(), false);
        memory::check_loader(&cfg, device)?;
    }
    memory::ImageBatches {
        batch: args.batch_size,
        size: args.image_size,
        value_bytes: if args.amp { 2 } else { 4 },
        batches: 1,
    }
    .check(device, "one batch of images on the model's device")
}

/// Where a rank sits in its group (one process: rank 0 of 1, GPU 0).
#[derive(Debug, Clone, Copy)]
struct Placement {
    rank: usize,
    world_size: usize,
    /// Ranks on this machine, which share its cores.
    local_processes: usize,
    /// This rank's CUDA device index.
    gpu: usize,
}

impl Default for Placement {
    fn default() -> Self {
        Self::of(None)
    }
}

impl Placement {
    fn of(dist: Option<&distributed::Distributed>) -> Self {
        Self {
            rank: dist.map_or(0, |d| d.rank),
            world_size: dist.map_or(1, |d| d.world_size),
            local_processes: dist.and_then(|d| d.local_world_size).unwrap_or(1),
            gpu: dist.and_then(|d| d.device).unwrap_or(0),
        }
    }
}

/// The training (or, with `eval`, the evaluation) loader of one rank.
fn loader_config(
    args: &TrainArgs,
    device: Device,
    loader: LoaderKind,
    place: &Placement,
    eval: bool,
) -> LoaderConfig {
    let cuda = device.is_cuda();
    let gpu = loader == LoaderKind::Gpu;
    let mut options = args.gpu.options(place.gpu);
    if options.hardware_share.is_none() && !eval {
        let threads = if args.threads > 0 {
            args.threads
        } else {
            convnets_pipeline::loader::core_share(place.local_processes)
        };
        options.hardware_share = Some(training_hardware_share(threads, args.arch));
    }
    let crops = if eval { Crops::Eval } else { Crops::Train };
    // fp16 NHWC is what a channels_last fp16 model wants; fp32 NCHW on CPU.
    let dtype = if args.amp {
        OutputDtype::F16
    } else {
        OutputDtype::F32
    };
    let layout = if cuda { Layout::Nhwc } else { Layout::Nchw };
    let mut cfg = LoaderConfig::preset(crops, args.batch_size, args.image_size, dtype, layout);
    cfg.backend = if gpu {
        Backend::Gpu(options)
    } else {
        Backend::Cpu
    };
    cfg.sampler.seed = args.seed;
    cfg.sampler.rank = place.rank;
    cfg.sampler.world_size = place.world_size;
    cfg.threads = args.threads;
    // Local ranks split the machine's cores between their loaders.
    cfg.local_processes = place.local_processes;
    cfg.prefetch = 3;
    cfg.on_bad_record = args.on_bad_record.into();
    cfg.pin_memory = (cuda && !gpu).then_some(device);
    cfg
}

/// The float flags as torch.optim.SGD and F.cross_entropy would take them: finite, and in
/// range (a NaN or negative LR would otherwise train silently to NaNs or by gradient ascent).
fn check_hyperparameters(args: &TrainArgs) -> anyhow::Result<()> {
    let checks: [(&str, f64, bool, &str); 7] = [
        ("--lr", args.lr, args.lr > 0.0, "a finite number > 0"),
        (
            "--warmup-epochs",
            args.warmup_epochs,
            args.warmup_epochs >= 0.0,
            "a finite number >= 0",
        ),
        (
            "--momentum",
            args.momentum,
            args.momentum >= 0.0,
            "a finite number >= 0",
        ),
        (
            "--weight-decay",
            args.weight_decay,
            args.weight_decay >= 0.0,
            "a finite number >= 0",
        ),
        (
            "--label-smoothing",
            args.label_smoothing,
            (0.0..=1.0).contains(&args.label_smoothing),
            "between 0 and 1",
        ),
        (
            "--mixup",
            args.mixup,
            args.mixup >= 0.0,
            "a finite number >= 0 (0: off)",
        ),
        (
            "--ema",
            args.ema.unwrap_or(0.5),
            args.ema.is_none_or(|d| d > 0.0 && d < 1.0),
            "between 0 and 1, exclusive",
        ),
    ];
    for (flag, value, ok, what) in checks {
        if !(value.is_finite() && ok) {
            bail!("{flag} must be {what}, got {value}");
        }
    }
    if let Some(bad) = args
        .lr_steps
        .iter()
        .find(|s| !(s.is_finite() && **s >= 0.0))
    {
        bail!("--lr-steps must be finite epochs >= 0, got {bad}");
    }
    if args.nesterov && args.momentum == 0.0 {
        bail!("--nesterov needs a --momentum above 0");
    }
    Ok(())
}

/// What `--loader auto` stands for on `device`, and why (`None` for an explicit choice).
pub(crate) fn resolve_loader(kind: LoaderKind, device: Device) -> (LoaderKind, Option<String>) {
    if kind != LoaderKind::Auto {
        return (kind, None);
    }
    if !device.is_cuda() {
        return (
            LoaderKind::Cpu,
            Some(format!(
                "--loader auto: the CPU loader, as the model runs on {device:?}"
            )),
        );
    }
    match convnets_pipeline::device::gpus() {
        Ok(_) => (
            LoaderKind::Gpu,
            Some(format!(
                "--loader auto: the GPU loader, as the model runs on {device:?}: batches are made on the GPU \
                 (nvJPEG's JPEG engines plus CPU threads decode, one kernel augments), which leaves the CPU \
                 threads only part of the JPEG work"
            )),
        ),
        Err(e) => (LoaderKind::Cpu, Some(format!("--loader auto: the CPU loader, as the GPU loader is not available ({e})"))),
    }
}

/// The GPU loader's hardware-decoder share for training when `--hw-decoder-load` is not
/// given (the pipeline's rule: CPU threads first, the JPEG engines for the rest), from the
/// model's measured H200 rate (BENCHMARKS.md). On a GPU much faster than an H200 the CPU
/// share may fall short; `--hw-decoder-load` sets it.
pub(crate) fn training_hardware_share(cpu_threads: usize, arch: Arch) -> f64 {
    let demand = match arch {
        Arch::ResNeXt101_32x4d => 2_900.0,
        Arch::SeResNeXt101_32x4d => 2_000.0,
        // resnet50's; the smaller ResNets consume more, the larger less.
        _ => 6_100.0,
    };
    convnets_pipeline::loader::training_hardware_share(cpu_threads, demand)
}

/// The train split, the val split (when evaluated) and the dataset's classes (none for a
/// synthetic run or a TFRecord folder).
type Data = (
    Option<Arc<dyn RecordSource>>,
    Option<Arc<dyn RecordSource>>,
    Vec<convnets_formats::ClassInfo>,
);

fn open_data(args: &TrainArgs) -> anyhow::Result<Data> {
    let (LoaderKind::Cpu | LoaderKind::Gpu | LoaderKind::Auto, Some(data)) =
        (&args.loader, &args.data)
    else {
        return Ok((None, None, Vec::new()));
    };
    let train = open_split(data, "train", 1)?;
    let val = if args.eval_every > 0 {
        Some(open_split(data, "val", 1)?)
    } else {
        None
    };
    let classes = convnets_formats::Dataset::open(data)
        .map(|d| d.manifest().classes.clone())
        .unwrap_or_default();
    Ok((Some(train), val, classes))
}

/// The model, initialised from `--seed` (channels_last for a GPU).
fn build_model(
    args: &TrainArgs,
    vs: &VarStore,
    num_classes: i64,
    device: Device,
) -> anyhow::Result<convnets_models::resnet::ResNet> {
    let memory_format = MemoryFormat::for_device(device);
    // libtorch's generator is global: hold it while seeding and initialising, so that the
    // same seed gives the same weights even with other runs in the process.
    let _rng = INIT_RNG.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(args.seed as i64);
    let cfg = ModelConfig {
        memory_format,
        zero_init_last_bn: args.zero_init_residual,
    };
    Ok(args.arch.build(&vs.root(), num_classes, &cfg)?)
}

/// The optimizer's saved buffers: momentum, and the weights' average when kept.
struct SavedOptimizer {
    momentum: Vec<(String, Tensor)>,
    ema: Option<Vec<(String, Tensor)>>,
}

/// Loads checkpoint `dir` into `vs` and returns its state (its loader position carried
/// over to a group of `world` ranks) and optimizer buffers.
fn restore(
    vs: &VarStore,
    dir: &std::path::Path,
    saved: TrainState,
    args: &TrainArgs,
    world: usize,
) -> anyhow::Result<(TrainState, SavedOptimizer)> {
    convnets_models::weights::load_safetensors(vs, dir.join(checkpoint::MODEL_NAME))?;
    let read = |name: &str| {
        let path = dir.join(name);
        Tensor::read_safetensors(&path)
            .with_context(|| format!("--resume: reading {}", path.display()))
    };
    let optimizer = SavedOptimizer {
        momentum: read(run_dir::OPTIMIZER_NAME)?,
        ema: args
            .ema
            .is_some()
            .then(|| read(checkpoint::EMA_NAME))
            .transpose()?,
    };
    eprintln!(
        "resuming from {} (epoch {}, step {})",
        dir.display(),
        saved.epoch,
        saved.step
    );
    let mut state = saved;
    if state.world_size != world {
        let old = state.world_size;
        state.loader = regroup(state.loader, old, world);
        eprintln!(
            "the run had {old} rank(s), now {world}: continuing epoch {} at batch {} per rank",
            state.loader.epoch, state.loader.batch
        );
        state.world_size = world;
    }
    Ok((state, optimizer))
}

/// SGD over the model's parameters (on their device), with the saved buffers of a resumed
/// run.
fn build_optimizer(
    vs: &VarStore,
    args: &TrainArgs,
    saved: Option<SavedOptimizer>,
) -> anyhow::Result<Sgd> {
    let mut sgd = Sgd::new(vs, args.momentum, args.weight_decay, args.nesterov)?;
    sgd.backbone_lr_scale = args.backbone_lr_scale;
    if let Some(decay) = args.ema {
        sgd.enable_ema(decay);
    }
    if let Some(saved) = saved {
        sgd.load_state(&saved.momentum.into_iter().collect())?;
        if let Some(ema) = saved.ema {
            sgd.load_ema_state(&ema.into_iter().collect())?;
        }
    }
    Ok(sgd)
}

/// Every rank starts from rank 0's weights, buffers and optimizer state.
fn start_from_main(d: &distributed::Distributed, sgd: &Sgd, vs: &VarStore) -> anyhow::Result<()> {
    let _guard = tch::no_grad_guard();
    for t in sgd.shared_state() {
        d.broadcast_from_main(&t)?;
    }
    // In name order: every rank must issue the same collectives in the same order
    // (`variables()` is a HashMap, whose order differs between processes).
    let mut buffers: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| !t.requires_grad())
        .collect();
    buffers.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, t) in &buffers {
        d.broadcast_from_main(t)?;
    }
    d.progress();
    Ok(())
}

/// `--lr` is per 256 images: scaled to the global batch of `world` ranks.
fn lr_schedule(args: &TrainArgs, world: usize) -> LrSchedule {
    let global_batch = (args.batch_size * world) as f64;
    LrSchedule {
        base_lr: args.lr * global_batch / 256.0,
        warmup_epochs: args.warmup_epochs,
        epochs: args.epochs as f64,
        kind: match args.lr_schedule {
            ScheduleArg::Cosine => ScheduleKind::Cosine,
            ScheduleArg::Linear => ScheduleKind::Linear,
            ScheduleArg::Step => ScheduleKind::Step {
                milestones: args.lr_steps.clone(),
                gamma: 0.1,
            },
        },
    }
}

fn step_options(args: &TrainArgs) -> StepOptions {
    StepOptions {
        amp: args.amp,
        label_smoothing: args.label_smoothing,
        // A frozen backbone's BN layers use (and keep) their running statistics.
        train_bn: !args.freeze_backbone,
        cuda_graphs: args.cuda_graphs,
        allreduce_kind: args.allreduce_dtype.kind(),
    }
}

/// Held while seeding libtorch's global generator and drawing from it (model init, test
/// data), so that runs and tests on other threads of the process do not interleave draws.
pub(crate) static INIT_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Non-finite losses in a row after which a run counts as diverged.
const NAN_STEPS_TO_STOP: u64 = 5;

struct Trainer {
    args: TrainArgs,
    run: RunDir,
    device: Device,
    vs: VarStore,
    model: convnets_models::resnet::ResNet,
    step: TrainStep,
    schedule: LrSchedule,
    meta: CheckpointMeta,
    train: Option<Arc<dyn RecordSource>>,
    val: Option<Arc<dyn RecordSource>>,
    state: TrainState,
    /// Rank 0 (or the only process) writes the log; the other ranks write nothing.
    log: Option<std::fs::File>,
    /// Writes rank 0's checkpoints in the background.
    checkpoints: run_dir::CheckpointWriter,
    dist: Option<Arc<distributed::Distributed>>,
    /// All ranks agreed to stop (Ctrl-C on any of them).
    stop: bool,
    /// Why `--loader auto` chose the loader it did.
    loader_choice: Option<String>,
}

impl Trainer {
    fn new(
        args: TrainArgs,
        run: RunDir,
        resume: Option<(PathBuf, TrainState)>,
        dist: Option<Arc<distributed::Distributed>>,
    ) -> anyhow::Result<Self> {
        // 1. Device and loader: args.json keeps `auto`, so a resumed run chooses again
        // (both loaders give the same records and crops).
        check_args(&args)?;
        let device = rank_device(&args, dist.as_deref())?;
        let mut args = args;
        let (loader, loader_choice) = resolve_loader(args.loader, device);
        args.loader = loader;
        check_memory(&args, device, loader)?;
        let world = dist.as_ref().map_or(1, |d| d.world_size);
        if let (Device::Cpu, Some(local)) = (device, dist.as_ref().and_then(|d| d.local_world_size))
        {
            // Ranks computing on the CPUs of one machine share its cores (as torchrun's
            // OMP_NUM_THREADS does) rather than each starting one thread per core.
            tch::set_num_threads(convnets_pipeline::loader::core_share(local) as i32);
        }
        // 2. Data and model.
        let (train, val, classes) = open_data(&args)?;
        let num_classes = if classes.is_empty() {
            1000
        } else {
            classes.len() as i64
        };
        let mut vs = VarStore::new(Device::Cpu);
        let model = build_model(&args, &vs, num_classes, device)?;
        let mut meta = CheckpointMeta::new(args.arch, num_classes);
        meta.classes = classes;
        meta.source = "convnets train".into();
        meta.image_size = Some(args.image_size);
        // 3. Weights and state: the checkpoint's when resuming, else --init-from's or fresh.
        let (state, saved_optimizer) = match resume {
            Some((dir, saved)) => {
                let (state, optimizer) = restore(&vs, &dir, saved, &args, world)?;
                (state, Some(optimizer))
            }
            None => {
                if let Some(source) = &args.init_from {
                    finetune::init_from(&vs, source, args.arch)?;
                }
                (TrainState::new(args.amp, world), None)
            }
        };
        vs.set_device(device);
        if args.freeze_backbone {
            finetune::freeze_backbone(&vs);
        }
        // 4. Optimizer (after the move: it re-points the parameters at its flat buffer),
        // the same on every rank, and the training step.
        let sgd = build_optimizer(&vs, &args, saved_optimizer)?;
        if let Some(d) = &dist {
            start_from_main(d, &sgd, &vs)?;
        }
        if device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let schedule = lr_schedule(&args, world);
        let step = TrainStep::new(sgd, &state.scaler, step_options(&args), device)?;
        // 5. The log (rank 0's), and the checkpoint writer.
        let main = dist.as_ref().is_none_or(|d| d.is_main());
        let log = if main {
            Some(run.open_log(state.step)?)
        } else {
            None
        };
        let checkpoints = run_dir::CheckpointWriter::new();
        let mut trainer = Self {
            args,
            run,
            device,
            vs,
            model,
            step,
            schedule,
            meta,
            train,
            val,
            state,
            log,
            checkpoints,
            dist,
            stop: false,
            loader_choice,
        };
        if let Some(why) = trainer.loader_choice.clone() {
            if trainer.main() {
                eprintln!("{why}");
            }
            trainer.log(LogRecord::Loader(log::LoaderChoice {
                step: trainer.state.step,
                loader: trainer.args.loader,
                reason: why,
            }))?;
        }
        Ok(trainer)
    }

    /// Copies the weights, optimizer and loader state to host memory now and writes them
    /// in the background (the previous checkpoint's write finishes first).
    fn save_checkpoint(&mut self) -> anyhow::Result<()> {
        let snapshot = self.run.snapshot(
            &self.vs,
            &self.step.sgd,
            &self.meta,
            &self.state,
            self.args.keep_last,
        )?;
        self.checkpoints.submit(snapshot)
    }

    fn main(&self) -> bool {
        self.dist.as_ref().is_none_or(|d| d.is_main())
    }

    fn loader_config(&self, eval: bool) -> LoaderConfig {
        let place = Placement::of(self.dist.as_deref());
        loader_config(&self.args, self.device, self.args.loader, &place, eval)
    }

    fn run(mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        // 1. The loader at the saved position, and pinned memory for the snapshots.
        let mut loader = match &self.train {
            Some(src) => Some(Loader::new(
                src.clone(),
                self.loader_config(false),
                self.state.loader,
            )?),
            None => None,
        };
        let steps_per_epoch = loader.as_ref().map_or(100, |l| l.batches_per_epoch()) as u64;
        self.pin_snapshot_memory()?;
        let bar = if self.main() {
            progress_bar(steps_per_epoch * self.args.epochs, self.state.step)
        } else {
            ProgressBar::hidden()
        };
        let mut progress = Progress::new(started, bar);
        // 2. Epoch after epoch: its steps, then its boundary (eval, checkpoint, records).
        let mut interrupted_at = None;
        while self.state.epoch < self.args.epochs {
            match self.run_epoch(&mut loader, steps_per_epoch, &mut progress)? {
                EpochEnd::Stopped(interrupted) => {
                    interrupted_at = interrupted;
                    break;
                }
                EpochEnd::StepsDone(at) => self.finish_epoch(loader.as_ref(), at, &mut progress)?,
            }
        }
        progress.bar.finish_and_clear();
        // 3. The summary, once the last checkpoint is on disk.
        self.checkpoints.wait()?;
        self.summarize(loader, progress)?;
        match interrupted_at {
            Some(i) => Err(i.into()),
            None => Ok(()),
        }
    }

    /// A snapshot taken and dropped now pins the host memory that the epoch-end snapshots
    /// then reuse (libtorch caches pinned blocks), so the first epoch boundary does not pay
    /// for pinning ~3x the model's size.
    fn pin_snapshot_memory(&self) -> anyhow::Result<()> {
        if self.main() && self.device.is_cuda() {
            drop(self.run.snapshot(
                &self.vs,
                &self.step.sgd,
                &self.meta,
                &self.state,
                self.args.keep_last,
            )?);
        }
        Ok(())
    }

    /// The steps of the current epoch, from the saved position; stops early (checkpoint
    /// saved) at `--max-steps` or on Ctrl-C.
    fn run_epoch(
        &mut self,
        loader: &mut Option<Loader>,
        steps_per_epoch: u64,
        p: &mut Progress,
    ) -> anyhow::Result<EpochEnd> {
        let epoch = self.state.epoch;
        let mut step_in_epoch = self.state.loader.batch as u64;
        loop {
            if self.args.max_steps.is_some_and(|m| self.state.step >= m)
                || self.stop
                || (self.dist.is_none() && interrupted())
            {
                let interrupted = self.stop_mid_epoch(loader.as_ref(), step_in_epoch, &p.bar)?;
                return Ok(EpochEnd::Stopped(interrupted));
            }
            let batch = match loader {
                Some(l) => match l.next_batch() {
                    Some(b) => Some(b.context("loading a batch")?),
                    None => break,
                },
                None if step_in_epoch < steps_per_epoch => None,
                None => break,
            };
            if let Some(b) = &batch {
                p.skipped_records += b.skipped.iter().filter(|s| **s).count() as u64;
            }
            let t = epoch as f64 + step_in_epoch as f64 / steps_per_epoch as f64;
            let lr = self.schedule.lr(t);
            let n = self.train_step(batch, lr, &mut p.held)?;
            self.state.step += 1;
            step_in_epoch += 1;
            p.images_done += n;
            p.window.1 += n;
            p.bar.inc(1);
            match &self.dist {
                None => self.stop = interrupted(),
                // Queuing a step counts as progress: when a collective hangs, the GPU's
                // queue fills, launches block, and the stall watch sees no more of it.
                Some(d) => d.progress(),
            }
            // The GPU is waited for here only: the loss and the scaler are read back
            // at logging points (and the ranks agree there on stopping).
            if self.state.step % self.args.log_every == 0 || step_in_epoch == steps_per_epoch {
                self.log_window(lr, p)?;
            }
        }
        Ok(EpochEnd::StepsDone(Instant::now()))
    }

    /// Stopped mid-epoch: saves where the run is, so --resume continues exactly. Returns
    /// the report of a one-process run stopped by Ctrl-C.
    fn stop_mid_epoch(
        &mut self,
        loader: Option<&Loader>,
        step_in_epoch: u64,
        bar: &ProgressBar,
    ) -> anyhow::Result<Option<Interrupted>> {
        self.state.loader = loader.map_or(
            LoaderState {
                epoch: self.state.epoch,
                batch: step_in_epoch as usize,
            },
            |l| l.state(),
        );
        self.state.scaler = self.step.scaler_state()?;
        let saved = if self.main() {
            self.save_checkpoint()?;
            self.checkpoints.wait()?
        } else {
            None
        };
        if self.dist.is_none() && interrupted() {
            return Ok(Some(Interrupted {
                step: self.state.step,
                checkpoint: saved,
            }));
        }
        bar.println(format!(
            "stopped at step {}; checkpoint saved, continue with --resume",
            self.state.step
        ));
        Ok(None)
    }

    /// A logging point: the steps since the last one read back (the one wait for the
    /// device), agreed on by the ranks, logged; a diverged run ends here.
    fn log_window(&mut self, lr: f64, p: &mut Progress) -> anyhow::Result<()> {
        let epoch = self.state.epoch;
        let r = self.step.readout()?;
        let (loss, diverged) = self.agree(r.loss, r.nonfinite_streak >= NAN_STEPS_TO_STOP)?;
        // All ranks together (each trained on as many images as this one).
        let ranks = self.dist.as_ref().map_or(1, |d| d.world_size) as f64;
        let img_s = p.window.1 as f64 * ranks / p.window.0.elapsed().as_secs_f64();
        p.window = (Instant::now(), 0);
        p.bar.set_message(format!(
            "epoch {epoch} loss {loss:.4} lr {lr:.4} {img_s:.0} img/s"
        ));
        self.log(LogRecord::Train(log::StepWindow {
            epoch,
            step: self.state.step,
            loss: Some(loss),
            lr: Some(lr),
            img_s: Some(img_s),
            loss_scale: Some(r.loss_scale),
            skipped_steps: Some(r.skipped_steps),
            skipped_records: Some(p.skipped_records),
        }))?;
        // Divergence guard: a few non-finite losses in a row (skipped steps) end the run.
        if diverged {
            self.checkpoints.wait()?;
            let last_good = match self.run.latest().ok().flatten() {
                Some((dir, _)) => format!("the last checkpoint is {}", dir.display()),
                None => "no checkpoint was written before it".to_string(),
            };
            bail!("loss was {loss} for {NAN_STEPS_TO_STOP} steps in a row (by step {}, epoch {epoch}): the run diverged \
                   ({last_good}; a lower --lr or a longer --warmup-epochs may help)", self.state.step);
        }
        Ok(())
    }

    /// An epoch's boundary (its steps ended at `steps_done`): evaluation, the best so far,
    /// the checkpoint, and the epoch's record.
    fn finish_epoch(
        &mut self,
        loader: Option<&Loader>,
        steps_done: Instant,
        p: &mut Progress,
    ) -> anyhow::Result<()> {
        let epoch = self.state.epoch;
        self.state.epoch += 1;
        self.state.loader = loader.map_or(
            LoaderState {
                epoch: epoch + 1,
                batch: 0,
            },
            |l| l.state(),
        );
        let eval = if self.val.is_some()
            && self.args.eval_every > 0
            && (epoch + 1) % self.args.eval_every == 0
        {
            Some(self.evaluate()?)
        } else {
            None
        };
        if let Some(e) = &eval {
            self.log(LogRecord::Eval(log::EvalRecord {
                epoch,
                step: Some(self.state.step),
                loss: Some(e.loss),
                top1: Some(e.top1),
                top5: Some(e.top5),
                images: Some(e.images),
            }))?;
            p.bar.println(format!(
                "epoch {epoch}: val top-1 {:.2} %, top-5 {:.2} %, loss {:.4}",
                e.top1 * 100.0,
                e.top5 * 100.0,
                e.loss
            ));
            p.last_eval = Some(e.clone());
        }
        if let Some(e) = eval.filter(|e| self.state.best_top1.is_none_or(|b| e.top1 > b)) {
            self.state.best_top1 = Some(e.top1);
            // This epoch's checkpoint (step-N of this step) becomes `best`.
            self.state.best_step = Some(self.state.step);
        }
        self.state.scaler = self.step.scaler_state()?;
        if self.main() {
            self.save_checkpoint()?;
        }
        // The epoch's rate over its whole wall time (its boundary included: eval,
        // checkpoint snapshot, the loader's turn), and what the boundary itself took.
        let world = self.dist.as_ref().map_or(1, |d| d.world_size) as u64;
        let now = Instant::now();
        let images = (p.images_done - p.epoch_mark.1) * world;
        let wall = now.duration_since(p.epoch_mark.0).as_secs_f64();
        let boundary_s = now.duration_since(steps_done).as_secs_f64();
        p.epoch_rates.push(images as f64 / wall);
        self.log(LogRecord::Epoch(log::EpochRecord {
            epoch,
            step: self.state.step,
            images,
            wall_s: wall,
            img_s: images as f64 / wall,
            boundary_s,
        }))?;
        p.epoch_mark = (now, p.images_done);
        Ok(())
    }

    /// The run's end: the check that the replicas stayed equal and the skipped records
    /// (collectives every rank joins), then rank 0's `summary.json`.
    fn summarize(&mut self, mut loader: Option<Loader>, p: Progress) -> anyhow::Result<()> {
        let wall = p.started.elapsed().as_secs_f64();
        // A check that data parallelism kept the replicas equal: the largest difference of
        // any weight from rank 0's, summed over the ranks (0 when identical).
        let weight_difference = match &self.dist {
            Some(d) => {
                let _guard = tch::no_grad_guard();
                let mine = self.step.sgd.shared_state().swap_remove(0);
                let mut main = mine.f_empty_like()?;
                main.f_copy_(&mine)?;
                d.broadcast_from_main(&main)?;
                let diff = mine.f_sub(&main)?.f_abs()?.f_max()?.f_double_value(&[])?;
                Some(d.sum_values(&[diff])?[0])
            }
            None => None,
        };
        // Every rank's skipped records (each read its own share of the data).
        let skipped_total = match &self.dist {
            Some(d) => d.sum_values(&[p.skipped_records as f64])?[0] as u64,
            None => p.skipped_records,
        };
        if !self.main() {
            return Ok(());
        }
        // The first thousand, so a badly damaged dataset does not make a huge summary.
        let skipped_list: Vec<_> = loader
            .as_mut()
            .map(|l| l.take_skipped())
            .unwrap_or_default()
            .into_iter()
            .take(1000)
            .collect();
        if skipped_total > 0 {
            eprintln!(
                "{skipped_total} record(s) could not be decoded and were replaced by another image of their batch \
                 (--on-bad-record skip); summary.json lists {}",
                if self.dist.is_some() { "rank 0's" } else { "them" }
            );
        }
        // Every rank trained on as many images as this one.
        let world = self.dist.as_ref().map_or(1, |d| d.world_size);
        let images_done = p.images_done * world as u64;
        // Share of the run the training loop spent waiting for the loader.
        let data_wait = loader.as_ref().map(|l| l.stats().wait_s / wall);
        let summary = json!({
            "arch": self.args.arch.name(), "epochs": self.state.epoch, "steps": self.state.step,
            "images": images_done, "wall_s": wall, "img_s": images_done as f64 / wall,
            "epoch_img_s": p.epoch_rates,
            "final_eval": p.last_eval, "best_top1": self.state.best_top1,
            "best_checkpoint": self.state.best_step.map(|s| self.run.checkpoints().join(checkpoint::step_name(s))),
            "skipped_steps": self.state.scaler.skipped_steps,
            "skipped_records": skipped_total,
            "skipped": skipped_list,
            "cuda_graphs": self.step.graphed(),
            "cuda_graphs_off_because": self.step.graph_note(),
            "data_wait_fraction": data_wait,
            "device": format!("{:?}", self.device),
            "amp": self.args.amp,
            "loader": self.args.loader,
            "loader_choice": self.loader_choice,
            "batch_size": self.args.batch_size,
            "world_size": world,
            "weight_difference_across_ranks": weight_difference,
            "run_dir": self.run.dir(),
        });
        self.run.write_summary(&summary)?;
        println!("{}", serde_json::to_string_pretty(&summary)?);
        Ok(())
    }

    /// One optimisation step (queued on the device, not waited for); returns the images.
    fn train_step(
        &mut self,
        batch: Option<Batch>,
        lr: f64,
        held: &mut HostBatchRelease<Batch>,
    ) -> anyhow::Result<u64> {
        let kind = if self.args.amp {
            Kind::Half
        } else {
            Kind::Float
        };
        let (images, labels) = match &batch {
            // Asynchronous from pinned memory on the CPU path (a no-op for GPU batches);
            // `held` keeps the batch until the copy is done.
            Some(b) => (
                b.images.f_to_device_(self.device, kind, true, false)?,
                b.labels
                    .f_to_device_(self.device, Kind::Int64, true, false)?,
            ),
            None => step::synthetic_batch(
                self.args.batch_size as i64,
                i64::from(self.args.image_size),
                self.meta.num_classes,
                self.device,
                self.args.amp,
            )?,
        };
        let n = labels.size()[0] as u64;
        let (images, mixed_with) = self.mixup(images, &labels)?;
        let input = StepInput {
            images: &images,
            labels: &labels,
            mixed_with: mixed_with.as_ref().map(|(l, t)| (*l, t)),
        };
        self.step
            .run(&self.model, input, lr, self.dist.as_deref())?;
        if let Some(b) = batch {
            held.hold(b, self.device)?;
        }
        Ok(n)
    }

    /// Mixup of a batch with a shuffled copy of itself; the weight and the permutation come
    /// from (seed, step), so a resumed run mixes exactly as the uninterrupted one.
    fn mixup(
        &self,
        images: Tensor,
        labels: &Tensor,
    ) -> anyhow::Result<(Tensor, Option<(f64, Tensor)>)> {
        if self.args.mixup <= 0.0 {
            return Ok((images, None));
        }
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let seed = self.args.seed ^ self.state.step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let lambda = rand_distr::Beta::new(self.args.mixup, self.args.mixup)
            .map_err(|e| anyhow::anyhow!("--mixup {}: {e}", self.args.mixup))?
            .sample(&mut rng);
        let mut order: Vec<i64> = (0..labels.size()[0]).collect();
        order.shuffle(&mut rng);
        let perm = Tensor::f_from_slice(&order)?.f_to_device(self.device)?;
        let mixed = images.f_mul_scalar(lambda)?.f_add(
            &images
                .f_index_select(0, &perm)?
                .f_mul_scalar(1.0 - lambda)?,
        )?;
        Ok((mixed, Some((lambda, labels.f_index_select(0, &perm)?))))
    }

    /// At a logging point: the mean loss over the ranks, whether any rank has diverged,
    /// and whether any rank was interrupted (so that all stop at the same step). Without a
    /// group: this process's figures.
    fn agree(&mut self, loss: f64, diverged: bool) -> anyhow::Result<(f64, bool)> {
        let Some(d) = &self.dist else {
            self.stop = interrupted();
            return Ok((loss, diverged));
        };
        let flag = |b: bool| f64::from(u8::from(b));
        let v = d.sum_values(&[loss, flag(diverged), flag(interrupted())])?;
        d.progress();
        self.stop = v[2] > 0.0;
        Ok((v[0] / d.world_size as f64, v[1] > 0.0))
    }

    /// Evaluates the averaged weights when an EMA is kept, else the live ones; with a
    /// group, each rank evaluates its share of the split and the counts are summed.
    fn evaluate(&mut self) -> anyhow::Result<EvalResult> {
        let val = self.val.clone().context("no val split")?;
        self.step.sgd.swap_ema();
        let result = evaluate(
            &self.model,
            val,
            self.loader_config(true),
            self.device,
            self.args.amp,
        );
        self.step.sgd.swap_ema();
        let r = result?;
        let Some(d) = &self.dist else { return Ok(r) };
        let n = r.images as f64;
        let s = d.sum_values(&[r.loss * n, r.top1 * n, r.top5 * n, n])?;
        d.progress();
        let total = s[3].max(1.0);
        Ok(EvalResult {
            loss: s[0] / total,
            top1: s[1] / total,
            top5: s[2] / total,
            images: s[3] as u64,
        })
    }

    fn log(&mut self, record: LogRecord) -> anyhow::Result<()> {
        if let Some(log) = &mut self.log {
            let line = record.to_line()?;
            writeln!(log, "{line}")
                .with_context(|| format!("writing {}", self.run.log_path().display()))?;
        }
        Ok(())
    }
}

/// How an epoch's steps ended.
enum EpochEnd {
    /// Its loader (or synthetic step count) ran out at this time.
    StepsDone(Instant),
    /// The run stopped mid-epoch, its checkpoint saved; with Ctrl-C's report when it was
    /// that, on a one-process run.
    Stopped(Option<Interrupted>),
}

/// What the training loop counts while it runs, for the logs and the summary.
struct Progress {
    started: Instant,
    /// Images this rank trained on.
    images_done: u64,
    /// Start of the current epoch (time, images): whole-epoch rates include the boundary.
    epoch_mark: (Instant, u64),
    epoch_rates: Vec<f64>,
    /// Start of the current logging window (time, images).
    window: (Instant, u64),
    last_eval: Option<EvalResult>,
    /// Records that failed to decode under --on-bad-record skip (replaced in their batch).
    skipped_records: u64,
    held: HostBatchRelease<Batch>,
    bar: ProgressBar,
}

impl Progress {
    fn new(started: Instant, bar: ProgressBar) -> Self {
        let now = Instant::now();
        Self {
            started,
            images_done: 0,
            epoch_mark: (now, 0),
            epoch_rates: Vec::new(),
            window: (now, 0),
            last_eval: None,
            skipped_records: 0,
            held: HostBatchRelease::default(),
            bar,
        }
    }
}

fn progress_bar(total: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30} {pos}/{len} steps eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(done);
    bar
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub images: u64,
}

/// Top-1/top-5 accuracy and mean loss over the whole split, every image exactly once.
pub fn evaluate(
    model: &convnets_models::resnet::ResNet,
    val: Arc<dyn RecordSource>,
    cfg: LoaderConfig,
    device: Device,
    amp: bool,
) -> anyhow::Result<EvalResult> {
    let _guard = tch::no_grad_guard();
    let mut loader = Loader::new(val, cfg, LoaderState::default())?;
    let (mut loss_sum, mut top1, mut top5, mut n) = (0.0, 0i64, 0i64, 0i64);
    while let Some(batch) = loader.next_batch() {
        let batch = batch?;
        let kind = if amp { Kind::Half } else { Kind::Float };
        let images = batch.images.f_to_device(device)?.f_to_kind(kind)?;
        let labels = batch.labels.f_to_device(device)?;
        let logits = eval_logits(model, &images, amp)?;
        loss_sum += logits
            .f_cross_entropy_loss::<Tensor>(&labels, None, Reduction::Sum, -100, 0.0)?
            .f_double_value(&[])?;
        let k = logits.size()[1].min(5);
        let (_, top) = logits.f_topk(k, 1, true, true)?;
        let hit = top.f_eq_tensor(&labels.f_unsqueeze(1)?)?;
        top1 += hit
            .f_narrow(1, 0, 1)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])?;
        top5 += hit.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        n += labels.size()[0];
    }
    let n_f = n.max(1) as f64;
    Ok(EvalResult {
        loss: loss_sum / n_f,
        top1: top1 as f64 / n_f,
        top5: top5 as f64 / n_f,
        images: n as u64,
    })
}

/// The model's fp32 logits for a batch already on its device, in eval mode (BN running
/// statistics); `amp` runs the forward under fp16 autocast. Shared by `eval` and `predict`.
pub fn eval_logits(
    model: &convnets_models::resnet::ResNet,
    images: &Tensor,
    amp: bool,
) -> anyhow::Result<Tensor> {
    let logits = tch::autocast(amp, || model.f_forward_t(images, false))?;
    Ok(logits.f_to_kind(Kind::Float)?)
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Dataset folder (or TFRecord folder) whose val split is evaluated.
    #[arg(long)]
    pub data: PathBuf,
    /// Checkpoint folder (a run's checkpoints/step-N or best, or import-weights output), or
    /// a run folder (its best checkpoint, else the latest).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "val")]
    pub split: String,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Side of the centre crop (after resizing the shorter side to 8/7 of it). Default: the
    /// size the checkpoint was trained at (224 for imported weights).
    #[arg(long)]
    pub image_size: Option<u32>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// `gpu`: decode and transform on the GPU (nvJPEG + fused kernel).
    #[arg(long, value_enum, default_value_t = LoaderKind::Cpu)]
    pub loader: LoaderKind,
    #[command(flatten)]
    pub gpu: GpuLoaderArgs,
    /// Evaluate the checkpoint's moving average of the weights (ema.safetensors).
    #[arg(long)]
    pub ema: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = device_of(a.device)?;
    let memory_format = MemoryFormat::for_device(device);
    let dir = checkpoint::resolve(&a.checkpoint)?;
    let loaded = checkpoint::load(
        &dir,
        device,
        &ModelConfig {
            memory_format,
            ..ModelConfig::default()
        },
    )?;
    if a.ema {
        checkpoint::apply_ema(&loaded.vs, &dir)?;
    }
    let backend = match a.loader {
        LoaderKind::Cpu => Backend::Cpu,
        LoaderKind::Gpu if device.is_cuda() => Backend::Gpu(a.gpu.options(0)),
        LoaderKind::Gpu => bail!(
            "--loader gpu needs a GPU{}",
            if cfg!(feature = "cuda") {
                ""
            } else {
                " (built without CUDA)"
            }
        ),
        LoaderKind::Synthetic => bail!("eval needs real data: --loader cpu or gpu"),
        LoaderKind::Auto => match resolve_loader(LoaderKind::Auto, device).0 {
            LoaderKind::Gpu => Backend::Gpu(a.gpu.options(0)),
            _ => Backend::Cpu,
        },
    };
    if let Ok(dataset) = convnets_formats::Dataset::open(&a.data) {
        loaded.meta.check_classes(
            &dataset.manifest().classes,
            &format!("{}", a.data.display()),
        )?;
    }
    let image_size = loaded.meta.eval_image_size(a.image_size);
    if image_size == 0 || a.batch_size == 0 {
        bail!("--image-size and --batch-size must be at least 1");
    }
    let layout = if device.is_cuda() {
        Layout::Nhwc
    } else {
        Layout::Nchw
    };
    let mut cfg = LoaderConfig::preset(
        Crops::Eval,
        a.batch_size,
        image_size,
        OutputDtype::F32,
        layout,
    );
    cfg.backend = backend;
    cfg.threads = a.threads;
    memory::check_loader(&cfg, device)?;
    memory::ImageBatches {
        batch: a.batch_size,
        size: image_size,
        value_bytes: 4,
        batches: 1,
    }
    .check(device, "one batch of images on the model's device")?;
    let val = open_split(&a.data, &a.split, 1)?;
    let r = evaluate(&loaded.model, val, cfg, device, false)
        .map_err(|e| memory::name_allocation_failure(e, a.batch_size, image_size, device))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} images: top-1 {:.2} %, top-5 {:.2} %, loss {:.4}",
            r.images,
            r.top1 * 100.0,
            r.top5 * 100.0,
            r.loss
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[test]
    fn training_sends_the_jpeg_engines_only_what_the_cpu_threads_cannot_carry() {
        let share = |t, arch| training_hardware_share(t, arch);
        assert_eq!(
            share(16, Arch::ResNet50),
            0.0,
            "16 threads carry resnet50 alone"
        );
        assert_eq!(share(8, Arch::SeResNeXt101_32x4d), 0.0);
        assert!((share(8, Arch::ResNet50) - (1.0 - 4480.0 / 6100.0)).abs() < 1e-12);
        assert!(
            share(1, Arch::ResNet50) > 0.9 && share(4, Arch::ResNet50) > share(8, Arch::ResNet50)
        );
    }

    #[test]
    fn a_resumed_run_with_another_group_size_goes_on_from_the_same_images() {
        let at = |epoch, batch| LoaderState { epoch, batch };
        // 10 batches per rank on 2 ranks = 20 global batches: 5 per rank on 4, 20 on 1.
        assert_eq!(regroup(at(3, 10), 2, 4), at(3, 5));
        assert_eq!(regroup(at(3, 10), 2, 1), at(3, 20));
        // Not a whole batch of the new group: back to the last whole one.
        assert_eq!(regroup(at(0, 3), 2, 4), at(0, 1));
        assert_eq!(regroup(at(1, 7), 1, 1), at(1, 7));
    }

    #[test]
    fn args_saved_before_fine_tuning_existed_still_load() -> anyhow::Result<()> {
        let args = Cli::try_parse_from([
            "train",
            "--init-from",
            "w.safetensors",
            "--freeze-backbone",
            "-o",
            "run",
        ])?
        .args;
        let mut saved = serde_json::to_value(&args)?;
        assert_eq!(saved["init_from"], "w.safetensors");
        for key in ["init_from", "freeze_backbone", "backbone_lr_scale"] {
            saved.as_object_mut().context("an object")?.remove(key);
        }
        let old: TrainArgs = serde_json::from_value(saved)?;
        assert_eq!(
            (old.init_from, old.freeze_backbone, old.backbone_lr_scale),
            (None, false, 1.0)
        );
        Ok(())
    }
}
