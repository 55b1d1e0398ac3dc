//! The loader: sampler -> decode + augment workers -> batches of tch tensors.
//!
//! ```text
//! planner thread      walks the sampler's batches, epoch after epoch; takes a free batch
//!                     slot (back-pressure: at most `prefetch + 2` batches exist) and sends
//!                     one task per sample
//! worker threads      record bytes (zero-copy from the mmap, CRC checked) -> crop plan from
//!                     the index's width/height -> decode (DCT-scaled, crop-aware) -> fused
//!                     crop/resize/flip/normalise/cast straight into the slot's tensor memory;
//!                     the worker finishing a batch's last sample hands the slot on
//! consumer            `next_batch` puts batches back in order and wraps the slot's tensors;
//!                     dropping the `Batch` returns the slot
//! ```
//! Every buffer (batch tensors, decode and resize scratch) is allocated up front or grows
//! once; nothing is allocated per batch in steady state. Per-sample randomness comes from
//! (seed, epoch, record index), so batches do not depend on the number of threads or on
//! scheduling, and a loader started from a saved [`LoaderState`] continues exactly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use convnets_formats::RecordSource;
use crossbeam::channel::{bounded, Receiver, Sender};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::cpu::augment::{Augmenter, Layout, OutputDtype, OutputSpec, WindowEdges};
use crate::cpu::decode::{CpuDecoder, DecodeLimits, RgbImage};
use crate::plan::{CenterCrop, CropWindow, RandomResizedCrop};
use crate::sampler::{sample_seed, Sample, Sampler, SamplerConfig};
use crate::{Error, Result};

/// The per-sample transform.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Transform {
    /// RandomResizedCrop + horizontal flip (training).
    Train(RandomResizedCrop),
    /// Resize the shorter side + centre crop (evaluation).
    Eval(CenterCrop),
}

impl Transform {
    /// How the resampling filter treats the crop window's edges: training crops first
    /// (torchvision's RandomResizedCrop), evaluation resizes the whole image first.
    pub fn window_edges(&self) -> WindowEdges {
        match self {
            Transform::Train(_) => WindowEdges::Crop,
            Transform::Eval(_) => WindowEdges::Image,
        }
    }
}

/// What to do with a record that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum BadRecordPolicy {
    /// The batch is returned as an error naming the shard and record.
    #[default]
    Error,
    /// The sample is replaced by another of the same batch, marked invalid, counted and
    /// listed in [`Loader::take_skipped`].
    Skip,
}

/// Which decoder and augmenter make the batches.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum Backend {
    /// libjpeg-turbo and the CPU augmenter on `threads` threads; batches in host memory.
    #[default]
    Cpu,
    /// nvJPEG (hardware JPEG engines first, CPU threads for what they cannot take) and
    /// one fused augment kernel per batch; batches in GPU memory. Needs the `cuda` feature.
    Gpu(GpuOptions),
}

/// Settings of the GPU path.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GpuOptions {
    /// CUDA device index.
    pub device: usize,
    /// Batches decoded at once, each by its own lane (nvJPEG state, CUDA stream, buffers).
    /// 0: the default, 4.
    pub lanes: usize,
    /// Share of the images the hardware decoder can take that it gets (like DALI's
    /// `hw_decoder_load`); the rest go to the CPU threads. `None`: a split that keeps the
    /// JPEG engines and the CPU threads both busy, from the number of CPU threads.
    pub hardware_share: Option<f64>,
    /// Decode only the crop window's region (training transform) on the hardware decoder.
    pub roi: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            device: 0,
            lanes: 0,
            hardware_share: None,
            roi: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub backend: Backend,
    pub sampler: SamplerConfig,
    pub transform: Transform,
    pub output: OutputSpec,
    /// Decode + augment threads (0: one per core of this process's share, see
    /// `local_processes`). On the GPU path these decode what the hardware decoder does not.
    pub threads: usize,
    /// Processes on this machine that each run a loader (one per local data-parallel
    /// rank): with `threads: 0` each takes an equal share of the cores.
    pub local_processes: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch: usize,
    pub on_bad_record: BadRecordPolicy,
    /// Images with more pixels are refused before decoding.
    pub max_pixels: u64,
    /// Check each record's CRC32C before decoding it.
    pub verify_crc: bool,
    /// Allocate batch memory page-locked, for fast (and asynchronous) copies to this GPU.
    /// (CPU path; GPU batches are in device memory already.)
    pub pin_memory: Option<Device>,
}

impl LoaderConfig {
    /// The cores this loader may keep busy: the machine's, shared with the other local
    /// processes that run one.
    pub fn cores(&self) -> usize {
        core_share(self.local_processes)
    }
}

/// One process's equal share of this machine's cores, when `processes` share it (at least 1).
/// Loader threads per core accepted at most: more only thrash, and a count in the tens of
/// thousands cannot even be started (the process aborts).
pub const MAX_THREADS_PER_CORE: usize = 8;

/// Refuses a thread count no machine benefits from, before any thread starts.
pub fn check_threads(threads: usize) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = MAX_THREADS_PER_CORE * cores;
    if threads > max {
        return Err(Error::Config(format!(
            "--threads {threads}: at most {max} ({MAX_THREADS_PER_CORE} per core, {cores} cores here; 0 takes one per core)"
        )));
    }
    Ok(())
}

pub fn core_share(processes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / processes.max(1)).max(1)
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Cpu,
            sampler: SamplerConfig::default(),
            transform: Transform::Train(RandomResizedCrop::default()),
            output: OutputSpec {
                width: 224,
                height: 224,
                dtype: OutputDtype::F32,
                layout: Layout::Nchw,
                normalize: Some(Default::default()),
            },
            threads: 0,
            local_processes: 1,
            prefetch: 2,
            on_bad_record: BadRecordPolicy::Error,
            max_pixels: DecodeLimits::default().max_pixels,
            verify_crc: true,
            pin_memory: None,
        }
    }
}

/// Where the loader stands: enough to continue exactly after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoaderState {
    pub epoch: u64,
    /// Index of the next batch within the epoch.
    pub batch: usize,
}

/// A record left out under [`BadRecordPolicy::Skip`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedRecord {
    pub epoch: u64,
    pub shard: PathBuf,
    pub record: u64,
    pub reason: String,
}

impl SkippedRecord {
    /// The record `index` of the split named by `e` (its shard and position there, when
    /// the error knows them).
    pub(crate) fn new(epoch: u64, index: u32, e: &Error) -> Self {
        let (shard, record) = match e {
            Error::Record { path, record, .. } => (path.clone(), *record),
            _ => (PathBuf::new(), u64::from(index)),
        };
        Self {
            epoch,
            shard,
            record,
            reason: e.to_string(),
        }
    }
}

/// `e` about record `index` of `source`, naming its file and position when known.
pub(crate) fn record_error(
    source: &dyn RecordSource,
    index: usize,
    e: impl std::fmt::Display,
) -> Error {
    match source.locate(index) {
        Ok((path, record)) => Error::Record {
            path,
            record,
            reason: e.to_string(),
        },
        Err(_) => Error::Config(format!("record {index}: {e}")),
    }
}

/// Time spent per stage, summed over threads, and queue occupancy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoaderStats {
    pub threads: usize,
    pub batches: u64,
    pub samples: u64,
    pub skipped: u64,
    /// Fetching record bytes and checking CRCs.
    pub read_s: f64,
    pub decode_s: f64,
    /// Host thread-seconds of the augment step (on the GPU path: building and queueing
    /// the batch's kernel).
    pub augment_s: f64,
    /// GPU seconds of the fused augment kernel (GPU path).
    pub augment_gpu_s: f64,
    /// Time the consumer waited in `next_batch`.
    pub wait_s: f64,
    /// Mean number of finished batches waiting when the consumer asked for one.
    pub mean_ready_batches: f64,
    /// Bytes of encoded images read.
    pub bytes_read: u64,
    /// Images decoded by the GPU's hardware JPEG decoder.
    pub decoded_hardware: u64,
    /// Images decoded on CPU threads (all of them on the CPU path).
    pub decoded_cpu: u64,
    /// Thread-seconds the GPU path's lanes spent in nvJPEG's batched hardware decode call.
    pub hardware_decode_s: f64,
    /// Hardware batches that failed twice and were decoded on the CPU instead.
    pub hardware_batch_failures: u64,
    /// The last error of a hardware batch (retried once, then decoded on the CPU).
    pub hardware_last_error: Option<String>,
    /// GPU memory held by the loader's own buffers: decode arenas, parameters, and the
    /// output batches it may have in flight (GPU path).
    pub gpu_buffer_bytes: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub batches: AtomicU64,
    pub samples: AtomicU64,
    pub skipped: AtomicU64,
    pub read_ns: AtomicU64,
    pub decode_ns: AtomicU64,
    pub augment_ns: AtomicU64,
    pub augment_gpu_ns: AtomicU64,
    pub wait_ns: AtomicU64,
    pub ready_sum: AtomicU64,
    pub ready_n: AtomicU64,
    pub bytes_read: AtomicU64,
    pub decoded_hardware: AtomicU64,
    pub decoded_cpu: AtomicU64,
    pub hardware_ns: AtomicU64,
    pub hardware_batch_failures: AtomicU64,
    pub hardware_last_error: Mutex<Option<String>>,
    pub gpu_buffer_bytes: AtomicU64,
}

impl Counters {
    pub(crate) fn stats(&self, threads: usize) -> LoaderStats {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let n = get(&self.ready_n).max(1) as f64;
        LoaderStats {
            threads,
            batches: get(&self.batches),
            samples: get(&self.samples),
            skipped: get(&self.skipped),
            read_s: s(&self.read_ns),
            decode_s: s(&self.decode_ns),
            augment_s: s(&self.augment_ns),
            augment_gpu_s: s(&self.augment_gpu_ns),
            wait_s: s(&self.wait_ns),
            mean_ready_batches: get(&self.ready_sum) as f64 / n,
            bytes_read: get(&self.bytes_read),
            decoded_hardware: get(&self.decoded_hardware),
            decoded_cpu: get(&self.decoded_cpu),
            hardware_decode_s: s(&self.hardware_ns),
            hardware_batch_failures: get(&self.hardware_batch_failures),
            hardware_last_error: lock(&self.hardware_last_error).clone(),
            gpu_buffer_bytes: get(&self.gpu_buffer_bytes),
        }
    }
}

/// The metadata of the batch a slot currently holds.
#[derive(Default)]
struct Job {
    seq: u64,
    epoch: u64,
    index: usize,
    samples: Vec<Sample>,
    skipped: Vec<bool>,
    /// Why each skipped sample was skipped; reported when the batch is delivered.
    skipped_records: Vec<SkippedRecord>,
    error: Option<Error>,
}

/// One batch's memory, reused for batch after batch.
struct Slot {
    images: TensorCell,
    labels: TensorCell,
    images_ptr: usize,
    labels_ptr: usize,
    sample_bytes: usize,
    job: Mutex<Job>,
    remaining: AtomicUsize,
}

/// Workers write through raw pointers into disjoint parts of the slot's tensors and never
/// touch the `Tensor` objects; only the consumer thread does, once the batch is complete.
struct TensorCell(Tensor);
// SAFETY: see above; the Tensor handle itself is used by one thread at a time.
unsafe impl Sync for TensorCell {}

struct Task {
    slot: Arc<Slot>,
    pos: usize,
    sample: Sample,
    epoch: u64,
}

/// A batch handed to the consumer. On the CPU path its tensors borrow the loader's reused
/// memory: they are valid while the `Batch` lives; copy them (`.copy()`, `.to_device(..)`)
/// to keep them longer. On the GPU path they are the batch's own, on the GPU.
pub struct Batch {
    /// `[n, 3, H, W]` (NHWC memory, channels_last, when the layout is `Nhwc`).
    pub images: Tensor,
    /// `[n]`, int64.
    pub labels: Tensor,
    pub epoch: u64,
    /// Index of the batch within its epoch.
    pub index: usize,
    /// Record index of each sample.
    pub samples: Vec<Sample>,
    /// Samples replaced because their record could not be decoded (skip policy).
    pub skipped: Vec<bool>,
    /// The CPU path's reused memory, and where to return it.
    slot: Option<(Arc<Slot>, Sender<Arc<Slot>>)>,
}

impl Batch {
    /// A batch owning its tensors (the GPU path's).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn owned(
        images: Tensor,
        labels: Tensor,
        epoch: u64,
        index: usize,
        samples: Vec<Sample>,
        skipped: Vec<bool>,
    ) -> Self {
        Self {
            images,
            labels,
            epoch,
            index,
            samples,
            skipped,
            slot: None,
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Samples that count for metrics: neither padding nor replaced.
    pub fn valid(&self) -> impl Iterator<Item = bool> + '_ {
        self.samples
            .iter()
            .zip(&self.skipped)
            .map(|(s, &k)| !s.padding && !k)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some((slot, free)) = self.slot.take() {
            if let Ok(mut job) = slot.job.lock() {
                // Hand the vectors back so the next batch reuses their capacity.
                job.samples = std::mem::take(&mut self.samples);
                job.skipped = std::mem::take(&mut self.skipped);
            }
            let _ = free.send(slot);
        }
    }
}

/// The loader of one rank. Threads start in `new` and are joined on drop.
pub struct Loader {
    inner: Inner,
}

enum Inner {
    Cpu(CpuLoader),
    #[cfg(feature = "cuda")]
    Gpu(crate::gpu::GpuLoader),
}

impl Loader {
    /// Starts the loader's threads, positioned at `state`. `cfg.backend` picks the CPU or
    /// the GPU path.
    pub fn new(
        source: Arc<dyn RecordSource>,
        cfg: LoaderConfig,
        state: LoaderState,
    ) -> Result<Self> {
        check_threads(cfg.threads)?;
        let inner = match cfg.backend {
            Backend::Cpu => Inner::Cpu(CpuLoader::new(source, cfg, state)?),
            #[cfg(feature = "cuda")]
            Backend::Gpu(gpu) => Inner::Gpu(crate::gpu::GpuLoader::new(source, cfg, gpu, state)?),
            #[cfg(not(feature = "cuda"))]
            Backend::Gpu(_) => {
                return Err(Error::BuiltWithoutCuda {
                    what: "the GPU loader",
                })
            }
        };
        Ok(Self { inner })
    }

    /// Batches per epoch for this rank.
    pub fn batches_per_epoch(&self) -> usize {
        self.position().batches_per_epoch
    }

    /// The epoch the next batch belongs to.
    pub fn epoch(&self) -> u64 {
        self.position().epoch
    }

    /// The position after the last batch returned; save it to resume exactly.
    pub fn state(&self) -> LoaderState {
        self.position().state
    }

    pub fn output(&self) -> &OutputSpec {
        match &self.inner {
            Inner::Cpu(l) => &l.output,
            #[cfg(feature = "cuda")]
            Inner::Gpu(l) => l.output(),
        }
    }

    /// The next batch of the current epoch, or `None` at the epoch's end (the following
    /// call starts the next epoch).
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        match &mut self.inner {
            Inner::Cpu(l) => l.next_batch(),
            #[cfg(feature = "cuda")]
            Inner::Gpu(l) => l.next_batch(),
        }
    }

    /// Counters since the loader started.
    pub fn stats(&self) -> LoaderStats {
        match &self.inner {
            Inner::Cpu(l) => l.counters.stats(l.worker_count),
            #[cfg(feature = "cuda")]
            Inner::Gpu(l) => l.stats(),
        }
    }

    /// Records skipped in the batches returned so far (skip policy), emptied by the call.
    pub fn take_skipped(&mut self) -> Vec<SkippedRecord> {
        match &mut self.inner {
            Inner::Cpu(l) => std::mem::take(&mut l.skipped),
            #[cfg(feature = "cuda")]
            Inner::Gpu(l) => l.take_skipped(),
        }
    }

    fn position(&self) -> &Position {
        match &self.inner {
            Inner::Cpu(l) => &l.batches.position,
            #[cfg(feature = "cuda")]
            Inner::Gpu(l) => l.position(),
        }
    }
}

/// The epoch being delivered and the resume position, the same for both paths.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Position {
    pub epoch: u64,
    pub state: LoaderState,
    pub batches_per_epoch: usize,
}

impl Position {
    pub fn new(state: LoaderState, batches_per_epoch: usize) -> Self {
        Self {
            epoch: state.epoch,
            state,
            batches_per_epoch,
        }
    }

    /// Takes batch `index` of `epoch` if it belongs to the epoch being delivered (and
    /// moves the state past it); otherwise starts that epoch and returns false: the
    /// caller holds the batch back and reports the end of the current epoch.
    pub fn advance(&mut self, epoch: u64, index: usize) -> bool {
        if epoch != self.epoch {
            self.epoch = epoch;
            return false;
        }
        self.state = if index + 1 == self.batches_per_epoch {
            LoaderState {
                epoch: epoch + 1,
                batch: 0,
            }
        } else {
            LoaderState {
                epoch,
                batch: index + 1,
            }
        };
        true
    }
}

/// A finished batch as loader threads hand it over, tagged with its place in the plan.
pub(crate) trait Sequenced {
    /// Its number in the planned stream of batches (0, 1, 2, ... across epochs).
    fn seq(&self) -> u64;
    /// (epoch, index within the epoch).
    fn place(&self) -> (u64, usize);
}

/// Finished batches put back in plan order (threads finish out of order) and delivered
/// one epoch at a time, the same for both paths: a batch of the next epoch, read ahead,
/// is held back until the consumer asks for that epoch.
pub(crate) struct InOrder<T> {
    ready: Receiver<T>,
    reorder: BTreeMap<u64, T>,
    next_seq: u64,
    /// A batch of the next epoch, read ahead.
    pending: Option<T>,
    pub position: Position,
    /// The error when the threads are gone.
    stopped: &'static str,
}

impl<T: Sequenced> InOrder<T> {
    pub fn new(ready: Receiver<T>, position: Position, stopped: &'static str) -> Self {
        Self {
            ready,
            reorder: BTreeMap::new(),
            next_seq: 0,
            pending: None,
            position,
            stopped,
        }
    }

    /// The next batch of the epoch being delivered; `None` at the epoch's end.
    pub fn next(&mut self, counters: &Counters) -> Option<Result<T>> {
        let batch = match self.pending.take() {
            Some(b) => b,
            None => match self.next_in_order(counters) {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            },
        };
        let (epoch, index) = batch.place();
        if !self.position.advance(epoch, index) {
            self.pending = Some(batch);
            return None;
        }
        Some(Ok(batch))
    }

    fn next_in_order(&mut self, counters: &Counters) -> Result<T> {
        let start = Instant::now();
        counters.ready_sum.fetch_add(
            (self.ready.len() + self.reorder.len()) as u64,
            Ordering::Relaxed,
        );
        counters.ready_n.fetch_add(1, Ordering::Relaxed);
        let batch = loop {
            if let Some(b) = self.reorder.remove(&self.next_seq) {
                break b;
            }
            let b = self
                .ready
                .recv()
                .map_err(|_| Error::Config(self.stopped.into()))?;
            self.reorder.insert(b.seq(), b);
        };
        self.next_seq += 1;
        counters
            .wait_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(batch)
    }

    /// The batches held here (read ahead, or waiting for an earlier one), for shutdown.
    pub fn take_held(&mut self) -> Vec<T> {
        let mut held: Vec<T> = self.pending.take().into_iter().collect();
        held.extend(std::mem::take(&mut self.reorder).into_values());
        held
    }

    /// The channel the threads deliver on, to drain at shutdown.
    pub fn ready(&self) -> &Receiver<T> {
        &self.ready
    }
}

/// Checks what both paths need and makes the sampler.
pub(crate) fn sampler_for(
    source: &dyn RecordSource,
    cfg: &LoaderConfig,
    state: LoaderState,
) -> Result<Sampler> {
    let sampler = Sampler::new(source.len(), cfg.sampler.clone())?;
    let batches_per_epoch = sampler.batches_per_epoch();
    if batches_per_epoch == 0 {
        return Err(Error::Config(format!(
            "{} records make no batch of {} for rank {} of {}",
            source.len(),
            cfg.sampler.batch_size,
            cfg.sampler.rank,
            cfg.sampler.world_size
        )));
    }
    if state.batch >= batches_per_epoch {
        return Err(Error::Config(format!(
            "resume position batch {} is past the epoch's {batches_per_epoch} batches",
            state.batch
        )));
    }
    if cfg.output.width == 0 || cfg.output.height == 0 {
        return Err(Error::Config("output size must be at least 1x1".into()));
    }
    Ok(sampler)
}

/// The CPU path.
struct CpuLoader {
    batches: InOrder<Arc<Slot>>,
    free: Sender<Arc<Slot>>,
    stop: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    /// Records skipped in the batches delivered so far.
    skipped: Vec<SkippedRecord>,
    worker_count: usize,
    output: OutputSpec,
}

impl CpuLoader {
    fn new(source: Arc<dyn RecordSource>, cfg: LoaderConfig, state: LoaderState) -> Result<Self> {
        let sampler = sampler_for(source.as_ref(), &cfg, state)?;
        let batches_per_epoch = sampler.batches_per_epoch();
        let workers = if cfg.threads == 0 {
            cfg.cores()
        } else {
            cfg.threads
        };
        let slots = cfg.prefetch.max(1) + 2;
        let (free_tx, free_rx) = bounded::<Arc<Slot>>(slots);
        for _ in 0..slots {
            free_tx
                .send(Arc::new(new_slot(
                    cfg.sampler.batch_size,
                    &cfg.output,
                    cfg.pin_memory,
                )?))
                .map_err(|_| Error::Config("slot pool closed".into()))?;
        }
        let (ready_tx, ready_rx) = bounded::<Arc<Slot>>(slots);
        let (task_tx, task_rx) = bounded::<Task>(cfg.sampler.batch_size * 2);
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let counters = Arc::new(Counters::default());

        let mut threads = Vec::with_capacity(workers + 1);
        let planner = {
            let stop_rx = stop_rx.clone();
            std::thread::Builder::new()
                .name("loader-planner".into())
                .spawn(move || plan_batches(sampler, state, free_rx, task_tx, stop_rx))
                .map_err(|e| Error::Config(format!("cannot start loader thread: {e}")))?
        };
        threads.push(planner);
        for w in 0..workers {
            let ctx = WorkerContext {
                source: source.clone(),
                cfg: cfg.clone(),
                tasks: task_rx.clone(),
                ready: ready_tx.clone(),
                counters: counters.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("loader-worker-{w}"))
                .spawn(move || ctx.run())
                .map_err(|e| Error::Config(format!("cannot start loader thread: {e}")))?;
            threads.push(handle);
        }
        Ok(Self {
            batches: InOrder::new(
                ready_rx,
                Position::new(state, batches_per_epoch),
                "loader threads stopped",
            ),
            free: free_tx,
            stop: Some(stop_tx),
            threads,
            counters,
            skipped: Vec::new(),
            worker_count: workers,
            output: cfg.output,
        })
    }

    fn next_batch(&mut self) -> Option<Result<Batch>> {
        let slot = self.batches.next(&self.counters)?;
        Some(slot.and_then(|slot| self.wrap(slot)))
    }

    fn wrap(&mut self, slot: Arc<Slot>) -> Result<Batch> {
        let (epoch, index, samples, skipped, error) = {
            let mut job = lock(&slot.job);
            if job.error.is_none() {
                let n = job.skipped_records.len() as u64;
                self.counters.skipped.fetch_add(n, Ordering::Relaxed);
                self.skipped.append(&mut job.skipped_records);
            }
            (
                job.epoch,
                job.index,
                std::mem::take(&mut job.samples),
                std::mem::take(&mut job.skipped),
                job.error.take(),
            )
        };
        let n = samples.len() as i64;
        let batch = Batch {
            images: slot.images.0.narrow(0, 0, n),
            labels: slot.labels.0.narrow(0, 0, n),
            epoch,
            index,
            samples,
            skipped,
            slot: Some((slot, self.free.clone())),
        };
        if let Some(e) = error {
            return Err(e); // `batch` drops here and returns the slot
        }
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters.samples.fetch_add(n as u64, Ordering::Relaxed);
        Ok(batch)
    }
}

impl Sequenced for Arc<Slot> {
    fn seq(&self) -> u64 {
        lock(&self.job).seq
    }

    fn place(&self) -> (u64, usize) {
        let job = lock(&self.job);
        (job.epoch, job.index)
    }
}

impl Drop for CpuLoader {
    fn drop(&mut self) {
        // Closing the stop channel wakes the planner; it drops the task sender, and the
        // workers finish what they hold and exit.
        self.stop.take();
        drop(self.batches.take_held());
        while self.batches.ready().try_recv().is_ok() {}
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A worker that panicked cannot leave a Job half-updated in a way that matters here.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_slot(batch: usize, out: &OutputSpec, pin: Option<Device>) -> Result<Slot> {
    let (b, h, w) = (batch as i64, i64::from(out.height), i64::from(out.width));
    let kind = match out.dtype {
        OutputDtype::U8 => Kind::Uint8,
        OutputDtype::F16 => Kind::Half,
        OutputDtype::Bf16 => Kind::BFloat16,
        OutputDtype::F32 => Kind::Float,
    };
    let images = match out.layout {
        Layout::Nchw => Tensor::empty([b, 3, h, w], (kind, Device::Cpu)),
        // channels_last: NHWC memory seen through an NCHW shape, as PyTorch does.
        Layout::Nhwc => Tensor::empty([b, h, w, 3], (kind, Device::Cpu)).permute([0, 3, 1, 2]),
    };
    let mut labels = Tensor::zeros([b], (Kind::Int64, Device::Cpu));
    let images = match pin {
        Some(device) => {
            if !tch::Cuda::is_available() {
                return Err(Error::Config("pinned batch memory needs a GPU".into()));
            }
            labels = labels.pin_memory(device);
            // pin_memory copies into page-locked memory, keeping the strides.
            images.pin_memory(device)
        }
        None => images,
    };
    Ok(Slot {
        images_ptr: images.data_ptr() as usize,
        labels_ptr: labels.data_ptr() as usize,
        images: TensorCell(images),
        labels: TensorCell(labels),
        sample_bytes: out.sample_bytes(),
        job: Mutex::new(Job::default()),
        remaining: AtomicUsize::new(0),
    })
}

/// The planner thread: batch after batch, epoch after epoch, until stopped.
fn plan_batches(
    sampler: Sampler,
    start: LoaderState,
    free: Receiver<Arc<Slot>>,
    tasks: Sender<Task>,
    stop: Receiver<()>,
) {
    for batch in sampler.batches_from(start.epoch, start.batch) {
        let slot = crossbeam::select! {
            recv(free) -> slot => match slot { Ok(s) => s, Err(_) => return },
            recv(stop) -> _ => return,
        };
        let (epoch, samples) = (batch.epoch, &batch.samples);
        {
            let mut job = lock(&slot.job);
            job.seq = batch.seq;
            job.epoch = epoch;
            job.index = batch.index;
            job.samples.clear();
            job.samples.extend_from_slice(samples);
            job.skipped.clear();
            job.skipped.resize(samples.len(), false);
            job.skipped_records.clear();
            job.error = None;
        }
        slot.remaining.store(samples.len(), Ordering::Release);
        for (pos, &sample) in samples.iter().enumerate() {
            let task = Task {
                slot: slot.clone(),
                pos,
                sample,
                epoch,
            };
            crossbeam::select! {
                send(tasks, task) -> r => if r.is_err() { return },
                recv(stop) -> _ => return,
            }
        }
    }
}

struct WorkerContext {
    source: Arc<dyn RecordSource>,
    cfg: LoaderConfig,
    tasks: Receiver<Task>,
    ready: Sender<Arc<Slot>>,
    counters: Arc<Counters>,
}

/// A worker's reusable scratch.
struct Scratch {
    decoder: CpuDecoder,
    augmenter: Augmenter,
    image: RgbImage,
}

impl WorkerContext {
    fn run(self) {
        let decoder = CpuDecoder::new(DecodeLimits {
            max_pixels: self.cfg.max_pixels,
        });
        let mut scratch = match decoder {
            Ok(decoder) => Scratch {
                decoder,
                augmenter: Augmenter::with_edges(self.cfg.transform.window_edges()),
                image: RgbImage {
                    width: 0,
                    height: 0,
                    data: Vec::new(),
                },
            },
            Err(e) => {
                // Without a decoder this worker can only report the failure, per task.
                let msg = e.to_string();
                for task in self.tasks.iter() {
                    self.finish(task, Err(Error::Config(msg.clone())));
                }
                return;
            }
        };
        for task in self.tasks.iter() {
            let result = self.process(&task, &mut scratch);
            self.finish(task, result);
        }
    }

    /// Fetch, plan, decode and augment one sample into its place in the batch.
    fn process(&self, task: &Task, s: &mut Scratch) -> Result<()> {
        let index = task.sample.index as usize;
        let t0 = Instant::now();
        let record = if self.cfg.verify_crc {
            self.source.record(index)?
        } else {
            self.source.record_unchecked(index)?
        };
        let t1 = Instant::now();
        let (width, height) = if record.width > 0 && record.height > 0 {
            (record.width, record.height)
        } else {
            // TFRecords without image/width, image/height: read the JPEG header.
            s.decoder
                .header(&record.data)
                .map_err(|e| self.record_error(index, e))?
        };
        let crop = self.plan(width, height, task.epoch, task.sample.index);
        let out = &self.cfg.output;
        let window = match self.cfg.transform {
            // Train: decode only the crop, DCT-scaled where the output allows.
            Transform::Train(_) => s
                .decoder
                .decode_for_crop(&record.data, &crop, out.width, out.height, &mut s.image)
                .map_err(|e| self.record_error(index, e))?,
            // Eval: torchvision resizes the whole image before cropping, so the filter reads
            // past the window's edges; decode everything at full scale to match it.
            Transform::Eval(_) => {
                s.decoder
                    .decode_full(&record.data, &mut s.image)
                    .map_err(|e| self.record_error(index, e))?;
                crop
            }
        };
        let t2 = Instant::now();
        let slot = &task.slot;
        // SAFETY: each task owns sample `pos` of its slot, a disjoint range of the slot's
        // tensor memory, which stays allocated while the slot exists.
        let sample = unsafe {
            std::slice::from_raw_parts_mut(
                (slot.images_ptr as *mut u8).add(task.pos * slot.sample_bytes),
                slot.sample_bytes,
            )
        };
        s.augmenter
            .crop_resize_into(
                &s.image.data,
                s.image.width,
                s.image.height,
                &window,
                out,
                sample,
            )
            .map_err(|e| self.record_error(index, e))?;
        // SAFETY: as above, label `pos` belongs to this task.
        unsafe { *(slot.labels_ptr as *mut i64).add(task.pos) = i64::from(record.label) };
        let t3 = Instant::now();
        let c = &self.counters;
        c.read_ns
            .fetch_add((t1 - t0).as_nanos() as u64, Ordering::Relaxed);
        c.decode_ns
            .fetch_add((t2 - t1).as_nanos() as u64, Ordering::Relaxed);
        c.decoded_cpu.fetch_add(1, Ordering::Relaxed);
        c.augment_ns
            .fetch_add((t3 - t2).as_nanos() as u64, Ordering::Relaxed);
        c.bytes_read
            .fetch_add(record.data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn plan(&self, width: u32, height: u32, epoch: u64, index: u32) -> CropWindow {
        match &self.cfg.transform {
            Transform::Train(rrc) => rrc.plan(
                width,
                height,
                sample_seed(self.cfg.sampler.seed, epoch, index),
            ),
            Transform::Eval(cc) => cc.plan(width, height),
        }
    }

    fn record_error(&self, index: usize, e: impl std::fmt::Display) -> Error {
        record_error(self.source.as_ref(), index, e)
    }

    /// Records the outcome of a sample; the last sample of a batch passes the slot on.
    fn finish(&self, task: Task, result: Result<()>) {
        let Task {
            slot, pos, epoch, ..
        } = task;
        if let Err(e) = result {
            let mut job = lock(&slot.job);
            match self.cfg.on_bad_record {
                BadRecordPolicy::Error => {
                    job.error.get_or_insert(e);
                }
                BadRecordPolicy::Skip => {
                    job.skipped[pos] = true;
                    let skipped = SkippedRecord::new(epoch, job.samples[pos].index, &e);
                    job.skipped_records.push(skipped);
                }
            }
        }
        if slot.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            fill_skipped(&slot);
            let _ = self.ready.send(slot);
        }
    }
}

/// Replaces skipped samples with a copy of the first good sample of the batch, so the
/// batch keeps its size (every rank must see equal batches); all bad is an error.
fn fill_skipped(slot: &Slot) {
    let mut job = lock(&slot.job);
    if job.error.is_some() || !job.skipped.iter().any(|&k| k) {
        return;
    }
    let Some(good) = job.skipped.iter().position(|&k| !k) else {
        job.error = Some(Error::Config(format!(
            "every record of batch {} of epoch {} failed to decode",
            job.index, job.epoch
        )));
        return;
    };
    let n = slot.sample_bytes;
    for bad in (0..job.skipped.len()).filter(|&i| job.skipped[i]) {
        // SAFETY: all tasks of this batch are finished; regions are disjoint.
        unsafe {
            let base = slot.images_ptr as *mut u8;
            std::ptr::copy_nonoverlapping(base.add(good * n), base.add(bad * n), n);
            let labels = slot.labels_ptr as *mut i64;
            *labels.add(bad) = *labels.add(good);
        }
    }
}
