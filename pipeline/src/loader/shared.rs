//! The backend-neutral half of the loader: its configuration, position and statistics,
//! the [`Batch`] both backends deliver, the bad-record bookkeeping, and [`InOrder`], which
//! puts finished batches back in plan order and delivers them one epoch at a time.
//! The backends (`cpu.rs`, `gpu.rs`) import from here; nothing here knows them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use convnets_formats::{Record, RecordSource};
use crossbeam::channel::Receiver;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::cpu::decode::DecodeLimits;
use crate::output::{Layout, OutputDtype, OutputSpec, WindowEdges};
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

/// Everything a [`Loader`](super::Loader) needs besides its records and start position.
/// `Default` is ImageNet training at 224 x 224, f32 NCHW, on the CPU path.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Which path makes the batches (CPU, or GPU with the `cuda` feature).
    pub backend: Backend,
    /// Batch size, shuffling, seed, rank split and last-batch policy.
    pub sampler: SamplerConfig,
    /// The per-sample transform (training or evaluation crop).
    pub transform: Transform,
    /// Size, element type, layout and normalisation of the images.
    pub output: OutputSpec,
    /// Decode + augment threads (0: one per core of this process's share, see
    /// `local_processes`). On the GPU path these decode what the hardware decoder does not.
    pub threads: usize,
    /// Processes on this machine that each run a loader (one per local data-parallel
    /// rank): with `threads: 0` each takes an equal share of the cores.
    pub local_processes: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch: usize,
    /// What a record that cannot be decoded does to its batch.
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

    /// The crop of record `index` in `epoch`, from the image's size alone; its randomness
    /// is keyed by (seed, epoch, record), so it does not depend on thread or lane.
    pub(crate) fn crop_plan(&self, width: u32, height: u32, epoch: u64, index: u32) -> CropWindow {
        match &self.transform {
            Transform::Train(rrc) => {
                rrc.plan(width, height, sample_seed(self.sampler.seed, epoch, index))
            }
            Transform::Eval(cc) => cc.plan(width, height),
        }
    }

    /// Record `index` of `source`, its CRC checked if `verify_crc` says so.
    pub(crate) fn read_record(
        &self,
        source: &dyn RecordSource,
        index: usize,
    ) -> convnets_formats::Result<Record> {
        if self.verify_crc {
            source.record(index)
        } else {
            source.record_unchecked(index)
        }
    }
}

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

/// One process's equal share of this machine's cores, when `processes` share it (at least 1).
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
    /// The epoch of the next batch.
    pub epoch: u64,
    /// Index of the next batch within the epoch.
    pub batch: usize,
}

/// A record left out under [`BadRecordPolicy::Skip`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedRecord {
    pub epoch: u64,
    /// The shard file, or empty when the error did not name it.
    pub shard: PathBuf,
    /// Position in the shard (in the split when `shard` is empty).
    pub record: u64,
    pub reason: String,
}

impl SkippedRecord {
    /// The record `index` of the split named by `e` (its shard and position there, when
    /// the error knows them).
    pub(super) fn new(epoch: u64, index: u32, e: &Error) -> Self {
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
pub(super) fn record_error(
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
        Err(_) => Error::RecordIndex {
            index,
            reason: e.to_string(),
        },
    }
}

/// Time spent per stage, summed over threads, and queue occupancy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoaderStats {
    /// Decode threads (on the GPU path: the CPU threads beside the hardware decoder).
    pub threads: usize,
    /// Batches delivered.
    pub batches: u64,
    /// Samples delivered, padding and replaced ones included.
    pub samples: u64,
    /// Records skipped under [`BadRecordPolicy::Skip`].
    pub skipped: u64,
    /// Fetching record bytes and checking CRCs.
    pub read_s: f64,
    /// Thread-seconds of JPEG decoding.
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
pub(super) struct Counters {
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
    pub(super) fn stats(&self, threads: usize) -> LoaderStats {
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

/// A batch handed to the consumer. On the CPU path its tensors borrow the loader's reused
/// memory: they are valid while the `Batch` lives; copy them (`.copy()`, `.to_device(..)`)
/// to keep them longer. On the GPU path they are the batch's own, on the GPU.
pub struct Batch {
    /// `[n, 3, H, W]` (NHWC memory, channels_last, when the layout is `Nhwc`).
    pub images: Tensor,
    /// `[n]`, int64.
    pub labels: Tensor,
    /// The epoch the batch belongs to.
    pub epoch: u64,
    /// Index of the batch within its epoch.
    pub index: usize,
    /// Record index of each sample.
    pub samples: Vec<Sample>,
    /// Samples replaced because their record could not be decoded (skip policy).
    pub skipped: Vec<bool>,
    /// The backend's reused memory the tensors live in (CPU path), returned on drop.
    lease: Option<Arc<dyn Recycle>>,
}

impl Batch {
    /// A batch owning its tensors (the GPU path's).
    pub(super) fn owned(
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
            lease: None,
        }
    }

    /// The batch's tensors live in `lease`'s memory, which goes back when it is dropped.
    pub(super) fn with_lease(mut self, lease: Arc<dyn Recycle>) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Samples in the batch (fewer than the batch size only for a `Partial` last batch).
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
        if let Some(lease) = self.lease.take() {
            // The vectors go back too, so the next batch reuses their capacity.
            let (samples, skipped) = (
                std::mem::take(&mut self.samples),
                std::mem::take(&mut self.skipped),
            );
            lease.recycle(samples, skipped);
        }
    }
}

/// Memory a [`Batch`]'s tensors borrow from their backend (the CPU path's batch slots).
pub(super) trait Recycle: Send + Sync {
    /// Takes back the batch's sample vectors and returns the memory to its pool.
    fn recycle(self: Arc<Self>, samples: Vec<Sample>, skipped: Vec<bool>);
}

/// The epoch being delivered and the resume position, the same for both paths.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
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
pub(super) trait Sequenced {
    /// Its number in the planned stream of batches (0, 1, 2, ... across epochs).
    fn seq(&self) -> u64;
    /// (epoch, index within the epoch).
    fn place(&self) -> (u64, usize);
}

/// Finished batches put back in plan order (threads finish out of order) and delivered
/// one epoch at a time, the same for both paths: a batch of the next epoch, read ahead,
/// is held back until the consumer asks for that epoch.
pub(super) struct InOrder<T> {
    ready: Receiver<T>,
    reorder: BTreeMap<u64, T>,
    next_seq: u64,
    /// A batch of the next epoch, read ahead.
    pending: Option<T>,
    pub position: Position,
    /// Which threads are gone, for the error when they are.
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
                .map_err(|_| Error::Stopped { what: self.stopped })?;
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
pub(super) fn sampler_for(
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

/// The value behind `m`, even if a thread panicked while holding it.
/// Starts a loader thread named `name`; failing to start it is an error naming it.
pub(super) fn spawn(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|source| Error::Spawn { name, source })
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A worker that panicked cannot leave a Job half-updated in a way that matters here.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
