//! The loader as Python sees it: the pipeline's [`Loader`] on a thread of its own, asked
//! for one batch at a time. Python waits for a batch with the GIL released, waking every
//! few milliseconds to run signal handlers, so Ctrl-C raises `KeyboardInterrupt` even while
//! the pipeline is blocked; the batch asked for is then kept and delivered by the next call,
//! so the stream of batches stays exact.

use std::path::PathBuf;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use convnets_pipeline::loader::{core_share, Crops};
use convnets_pipeline::sampler::LastBatch;
use convnets_pipeline::{
    Backend, BadRecordPolicy, GpuOptions, Layout, Loader, LoaderConfig, LoaderState, LoaderStats,
    OutputDtype, SkippedRecord,
};
use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::Tensor;

use crate::dataset::open_split;
use crate::{pipeline_err, tch_err, Error};

/// How often a waiting `next_batch` looks at pending signals.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// GPU loader lanes: the default of `convnets train --gpu-lanes`.
const GPU_LANES: usize = 4;

/// Batches kept ready ahead of Python, as `convnets train` keeps.
const PREFETCH: usize = 3;

/// The loader's options as the Python wrapper resolved them (device index, rank and world
/// size already taken from torch.distributed or the environment).
struct Options {
    batch_size: usize,
    gpu: Option<usize>,
    eval: bool,
    image_size: u32,
    dtype: OutputDtype,
    channels_last: bool,
    seed: u64,
    threads: usize,
    hw_decoder_load: Option<f64>,
    rank: usize,
    world_size: usize,
    local_processes: usize,
    drop_last: Option<bool>,
    shuffle: Option<bool>,
    on_bad_record: BadRecordPolicy,
}

/// The [`LoaderConfig`] `convnets train` builds for the same request
/// ([`LoaderConfig::preset`]): RandomResizedCrop + flip, shuffled, incomplete last batch
/// dropped for training; resize to 8/7 of the crop + centre crop, in order, every image
/// once for evaluation; ImageNet normalisation for every dtype but uint8.
fn loader_config(o: &Options) -> PyResult<LoaderConfig> {
    if o.image_size == 0 {
        return Err(PyValueError::new_err("image_size must be at least 1"));
    }
    let eval = o.eval;
    let crops = if eval { Crops::Eval } else { Crops::Train };
    let layout = if o.channels_last {
        Layout::Nhwc
    } else {
        Layout::Nchw
    };
    let mut cfg = LoaderConfig::preset(crops, o.batch_size, o.image_size, o.dtype, layout);
    cfg.sampler.seed = o.seed;
    cfg.sampler.shuffle = o.shuffle.unwrap_or(!eval);
    cfg.sampler.rank = o.rank;
    cfg.sampler.world_size = o.world_size;
    cfg.sampler.last_batch = if o.drop_last.unwrap_or(!eval) {
        LastBatch::Drop
    } else {
        LastBatch::Partial
    };
    cfg.threads = o.threads;
    cfg.local_processes = o.local_processes.max(1);
    cfg.prefetch = PREFETCH;
    cfg.on_bad_record = o.on_bad_record;
    if let Some(device) = o.gpu {
        let mut hardware_share = o.hw_decoder_load;
        if let Some(share) = hardware_share {
            if !(0.0..=1.0).contains(&share) {
                return Err(PyValueError::new_err(format!(
                    "hw_decoder_load must be within 0..=1, got {share}"
                )));
            }
        } else if !eval {
            let threads = if o.threads > 0 {
                o.threads
            } else {
                core_share(cfg.local_processes)
            };
            hardware_share = Some(training_hardware_share(threads));
        }
        cfg.backend = Backend::Gpu(GpuOptions {
            device,
            lanes: GPU_LANES,
            hardware_share,
            roi: true,
        });
    }
    check_host_memory(&cfg)?;
    Ok(cfg)
}

/// resnet50's training rate on an H200 (BENCHMARKS.md): the model whose hardware-decoder
/// share `convnets train` picks when none is given, as it does for resnet50.
const RESNET50_IMAGES_PER_S: f64 = 6_100.0;

fn training_hardware_share(cpu_threads: usize) -> f64 {
    convnets_pipeline::loader::training_hardware_share(cpu_threads, RESNET50_IMAGES_PER_S)
}

/// Refuses batches whose size alone could not be allocated: the CPU loader keeps
/// `prefetch + 2` batches in host memory, and a size typed by a user must not reach an
/// allocation that aborts the interpreter.
fn check_host_memory(cfg: &LoaderConfig) -> PyResult<()> {
    if cfg.backend != Backend::Cpu {
        return Ok(());
    }
    let side = u64::from(cfg.output.width.max(cfg.output.height));
    let bytes = (cfg.sampler.batch_size as u64)
        .checked_mul(side * side * 3 * cfg.output.dtype.size() as u64)
        .and_then(|b| b.checked_mul(cfg.prefetch.max(1) as u64 + 2));
    // SAFETY: sysconf only reads configuration values.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let memory = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    match bytes {
        Some(b) if memory == 0 || b <= memory => Ok(()),
        _ => Err(PyValueError::new_err(format!(
            "batches of {} images of {side}x{side} ({} batches held by the CPU loader) need more than this machine's {} GiB of memory",
            cfg.sampler.batch_size,
            cfg.prefetch.max(1) + 2,
            memory >> 30
        ))),
    }
}

/// A batch as it goes to Python.
struct Delivered {
    images: Tensor,
    labels: Tensor,
    /// The loader's position after this batch.
    state: LoaderState,
    /// The loader's counters after this batch.
    stats: LoaderStats,
    /// Records skipped in this batch (skip policy).
    skipped: Vec<SkippedRecord>,
}

/// The thread that owns the pipeline's loader and answers requests for batches.
struct Worker {
    requests: Option<Sender<()>>,
    replies: Receiver<Result<Delivered, PyErr>>,
    thread: Option<JoinHandle<()>>,
    /// A batch was asked for and its reply not yet taken (the wait was interrupted).
    in_flight: bool,
    /// A reply taken as a signal came in: it goes to the next call. (In a mutex only
    /// because tensors are not `Sync`, which a Python class must be.)
    held: Mutex<Option<Result<Delivered, PyErr>>>,
}

impl Worker {
    fn start(loader: Loader, copy: bool) -> PyResult<Self> {
        let (requests, asked) = bounded::<()>(1);
        let (reply, replies) = bounded(1);
        let thread = std::thread::Builder::new()
            .name("convnets-py".into())
            .spawn(move || {
                let mut loader = loader;
                while asked.recv().is_ok() {
                    if reply.send(next_delivered(&mut loader, copy)).is_err() {
                        break;
                    }
                }
                // Dropping the loader here stops and joins its threads.
            })
            .map_err(|e| Error::new_err(format!("cannot start the loader's thread: {e}")))?;
        Ok(Self {
            requests: Some(requests),
            replies,
            thread: Some(thread),
            in_flight: false,
            held: Mutex::new(None),
        })
    }

    /// The next batch, waiting with the GIL released and running signal handlers between
    /// short waits (a `KeyboardInterrupt` leaves the request in flight for the next call).
    fn next(&mut self, py: Python<'_>) -> PyResult<Delivered> {
        if let Some(reply) = held(&mut self.held).take() {
            return reply;
        }
        if !self.in_flight {
            let sent = self.requests.as_ref().map(|r| r.send(()));
            if !matches!(sent, Some(Ok(()))) {
                return Err(Error::new_err("the loader has been closed"));
            }
            self.in_flight = true;
        }
        loop {
            let replies = &self.replies;
            match py.allow_threads(|| replies.recv_timeout(SIGNAL_POLL)) {
                Ok(reply) => {
                    self.in_flight = false;
                    // A Ctrl-C that came during the wait is raised here, with the batch
                    // kept for the next call, rather than by the interpreter just after
                    // this returns, which would lose the batch.
                    if let Err(interrupt) = py.check_signals() {
                        *held(&mut self.held) = Some(reply);
                        return Err(interrupt);
                    }
                    return reply;
                }
                Err(RecvTimeoutError::Timeout) => py.check_signals()?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::new_err("the loader's thread stopped"))
                }
            }
        }
    }

    /// Stops the thread (after the batch it may be making) and joins it with the loader's
    /// own threads.
    fn stop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            // A reply still owed is dropped with the channel.
            let _ = thread.join();
        }
    }
}

/// The held reply (the mutex is never contended: `&mut` proves it).
fn held(m: &mut Mutex<Option<Result<Delivered, PyErr>>>) -> &mut Option<Result<Delivered, PyErr>> {
    m.get_mut().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The loader's next batch, skipping the `None` that marks an epoch's end (epochs are
/// counted on the Python side from the position, see [`NativeLoader::next_batch`]).
fn next_delivered(loader: &mut Loader, copy: bool) -> Result<Delivered, PyErr> {
    // At most one epoch end comes before a batch.
    for _ in 0..2 {
        let Some(batch) = loader.next_batch() else {
            continue;
        };
        let batch = batch.map_err(pipeline_err)?;
        // The CPU path's tensors live in one of the loader's batch slots, which goes back
        // to the loader for reuse when `batch` drops. Python may keep a batch for as long
        // as it likes (a list of batches, a tensor stored in a model), so the batch is
        // copied into memory of its own: one memcpy, small against decoding it. Keeping the
        // slot alive with the tensor instead would let a Python program that holds a few
        // batches take every slot and stall the loader. The GPU path's tensors are the
        // batch's own and go to Python as they are (zero-copy).
        let (images, labels) = if copy {
            (copied(&batch.images)?, copied(&batch.labels)?)
        } else {
            (batch.images.shallow_clone(), batch.labels.shallow_clone())
        };
        drop(batch);
        return Ok(Delivered {
            images,
            labels,
            state: loader.state(),
            stats: loader.stats(),
            skipped: loader.take_skipped(),
        });
    }
    Err(Error::new_err("the loader returned no batch"))
}

/// A copy of `t` in memory of its own, with the same strides (channels_last stays so).
fn copied(t: &Tensor) -> PyResult<Tensor> {
    let mut out = t
        .f_empty_like()
        .map_err(|e| tch_err("allocating a batch", e))?;
    out.f_copy_(t).map_err(|e| tch_err("copying a batch", e))?;
    Ok(out)
}

/// One rank's loader. Wrapped by `convnets.Loader` (convnets/__init__.py), which resolves
/// devices, dtypes and the rank from torch.
#[pyclass(module = "convnets._convnets")]
pub struct NativeLoader {
    config: LoaderConfig,
    source: std::sync::Arc<dyn convnets_formats::RecordSource>,
    worker: Option<Worker>,
    /// The position after the last batch handed to Python.
    state: LoaderState,
    batches_per_epoch: usize,
    /// Counters as of the last batch.
    stats: LoaderStats,
    /// Skipped records not yet taken by Python.
    skipped: Vec<SkippedRecord>,
}

#[pymethods]
impl NativeLoader {
    #[new]
    #[pyo3(signature = (
        path, split, batch_size, gpu, transform, image_size, dtype, channels_last, seed,
        threads, hw_decoder_load, rank, world_size, local_processes, drop_last, shuffle,
        on_bad_record, label_offset
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        split: &str,
        batch_size: usize,
        gpu: Option<usize>,
        transform: &str,
        image_size: u32,
        dtype: &str,
        channels_last: bool,
        seed: u64,
        threads: usize,
        hw_decoder_load: Option<f64>,
        rank: usize,
        world_size: usize,
        local_processes: usize,
        drop_last: Option<bool>,
        shuffle: Option<bool>,
        on_bad_record: &str,
        label_offset: i64,
    ) -> PyResult<Self> {
        let options = Options {
            batch_size,
            gpu,
            eval: match transform {
                "train" => false,
                "eval" => true,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "transform must be 'train' or 'eval', got {other:?}"
                    )))
                }
            },
            image_size,
            dtype: match dtype {
                "float32" => OutputDtype::F32,
                "float16" => OutputDtype::F16,
                "bfloat16" => OutputDtype::Bf16,
                "uint8" => OutputDtype::U8,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "dtype must be torch.float32, float16, bfloat16 or uint8, got {other}"
                    )))
                }
            },
            channels_last,
            seed,
            threads,
            hw_decoder_load,
            rank,
            world_size,
            local_processes,
            drop_last,
            shuffle,
            on_bad_record: match on_bad_record {
                "error" => BadRecordPolicy::Error,
                "skip" => BadRecordPolicy::Skip,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "on_bad_record must be 'error' or 'skip', got {other:?}"
                    )))
                }
            },
        };
        let config = loader_config(&options)?;
        let source = open_split(&path, split, label_offset)?;
        let mut loader = Self {
            config,
            source,
            worker: None,
            state: LoaderState::default(),
            batches_per_epoch: 0,
            stats: LoaderStats::default(),
            skipped: Vec::new(),
        };
        loader.start(py, LoaderState::default())?;
        Ok(loader)
    }

    /// The next batch of `epoch` as `(images, labels)`, or `None` once the loader's
    /// position has moved past that epoch.
    fn next_batch(&mut self, py: Python<'_>, epoch: u64) -> PyResult<Option<(PyTensor, PyTensor)>> {
        if self.state.epoch != epoch {
            return Ok(None);
        }
        let worker = self
            .worker
            .as_mut()
            .ok_or_else(|| Error::new_err("the loader has been closed"))?;
        let batch = worker.next(py)?;
        self.state = batch.state;
        self.stats = batch.stats;
        self.skipped.extend(batch.skipped);
        Ok(Some((PyTensor(batch.images), PyTensor(batch.labels))))
    }

    /// Batches per epoch for this rank.
    fn batches_per_epoch(&self) -> usize {
        self.batches_per_epoch
    }

    /// `(epoch, batch)`: the epoch and index of the next batch.
    fn state(&self) -> (u64, usize) {
        (self.state.epoch, self.state.batch)
    }

    /// Restarts the loader at `(epoch, batch)`.
    fn load_state(&mut self, py: Python<'_>, epoch: u64, batch: usize) -> PyResult<()> {
        self.close(py);
        self.start(py, LoaderState { epoch, batch })
    }

    /// The loader's counters as of the last batch (since it (re)started), as JSON text.
    fn stats(&self) -> PyResult<String> {
        serde_json::to_string(&self.stats).map_err(|e| Error::new_err(e.to_string()))
    }

    /// Records skipped (skip policy) in the batches returned since the last call, as JSON
    /// text; emptied by the call.
    fn take_skipped(&mut self) -> PyResult<String> {
        let skipped = std::mem::take(&mut self.skipped);
        serde_json::to_string(&skipped).map_err(|e| Error::new_err(e.to_string()))
    }

    /// Stops the loader's threads; the loader cannot be iterated afterwards.
    fn close(&mut self, py: Python<'_>) {
        if let Some(mut worker) = self.worker.take() {
            py.allow_threads(|| worker.stop());
        }
    }
}

impl NativeLoader {
    fn start(&mut self, py: Python<'_>, state: LoaderState) -> PyResult<()> {
        let (source, config) = (self.source.clone(), self.config.clone());
        let loader = py
            .allow_threads(|| Loader::new(source, config, state))
            .map_err(pipeline_err)?;
        self.batches_per_epoch = loader.batches_per_epoch();
        self.state = state;
        self.worker = Some(Worker::start(loader, self.config.backend == Backend::Cpu)?);
        Ok(())
    }
}
