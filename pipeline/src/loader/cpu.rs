//! The CPU backend: sampler -> decode + augment workers -> batches of tch tensors.
//!
//! ```text
//! planner thread      walks the sampler's batches, epoch after epoch; takes a free batch
//!                     slot (back-pressure: at most `prefetch + 2` batches exist) and sends
//!                     one task per sample
//! worker threads      record bytes (zero-copy from the mmap, CRC checked) -> crop plan from
//!                     the index's width/height -> decode (libjpeg-turbo, DCT-scaled,
//!                     crop-aware) -> fused crop/resize/flip/normalise/cast straight into the
//!                     slot's tensor memory; the worker finishing a batch's last sample hands
//!                     the slot on
//! consumer            `next_batch` puts batches back in order ([`InOrder`]) and wraps the
//!                     slot's tensors; dropping the `Batch` returns the slot
//! ```
//! Every buffer (batch tensors, decode and resize scratch) is allocated up front or grows
//! once; nothing is allocated per batch in steady state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use convnets_formats::RecordSource;
use crossbeam::channel::{bounded, Receiver, Sender};
use tch::{Device, Kind, Tensor};

use super::shared::{
    lock, record_error, sampler_for, spawn, BadRecordPolicy, Batch, Counters, InOrder,
    LoaderConfig, LoaderState, LoaderStats, Position, Recycle, Sequenced, SkippedRecord, Transform,
};
use crate::cpu::augment::Augmenter;
use crate::cpu::decode::{CpuDecoder, DecodeLimits, RgbImage};
use crate::output::OutputSpec;
use crate::sampler::{Sample, Sampler};
use crate::{Error, Result};

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
    /// The free list the slot goes back to once its batch is dropped; weak, so a slot
    /// waiting in that channel does not keep the channel alive.
    free: Weak<Sender<Arc<Slot>>>,
}

impl Recycle for Slot {
    fn recycle(self: Arc<Self>, samples: Vec<Sample>, skipped: Vec<bool>) {
        if let Ok(mut job) = self.job.lock() {
            job.samples = samples;
            job.skipped = skipped;
        }
        // Gone with the loader: the slot's memory is freed with the last reference.
        if let Some(free) = self.free.upgrade() {
            let _ = free.send(self);
        }
    }
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

/// The CPU path.
pub(super) struct CpuLoader {
    batches: InOrder<Arc<Slot>>,
    /// The slots' free list, held here only to keep it open: slots hold it weakly, so it
    /// closes with the loader.
    _free: Arc<Sender<Arc<Slot>>>,
    stop: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    /// Records skipped in the batches delivered so far.
    skipped: Vec<SkippedRecord>,
    worker_count: usize,
    output: OutputSpec,
}

impl CpuLoader {
    pub(super) fn new(
        source: Arc<dyn RecordSource>,
        cfg: LoaderConfig,
        state: LoaderState,
    ) -> Result<Self> {
        let sampler = sampler_for(source.as_ref(), &cfg, state)?;
        let batches_per_epoch = sampler.batches_per_epoch();
        let workers = if cfg.threads == 0 {
            cfg.cores()
        } else {
            cfg.threads
        };
        let slots = cfg.prefetch.max(1) + 2;
        let (free_tx, free_rx) = bounded::<Arc<Slot>>(slots);
        let free_tx = Arc::new(free_tx);
        for _ in 0..slots {
            let slot = new_slot(
                cfg.sampler.batch_size,
                &cfg.output,
                cfg.pin_memory,
                Arc::downgrade(&free_tx),
            )?;
            free_tx.send(Arc::new(slot)).map_err(|_| Error::Stopped {
                what: "the loader's slot pool",
            })?;
        }
        let (ready_tx, ready_rx) = bounded::<Arc<Slot>>(slots);
        let (task_tx, task_rx) = bounded::<Task>(cfg.sampler.batch_size * 2);
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let counters = Arc::new(Counters::default());

        let mut threads = Vec::with_capacity(workers + 1);
        let planner = {
            let stop_rx = stop_rx.clone();
            spawn("loader-planner".into(), move || {
                plan_batches(sampler, state, free_rx, task_tx, stop_rx)
            })?
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
            threads.push(spawn(format!("loader-worker-{w}"), move || ctx.run())?);
        }
        Ok(Self {
            batches: InOrder::new(
                ready_rx,
                Position::new(state, batches_per_epoch),
                "loader threads stopped",
            ),
            _free: free_tx,
            stop: Some(stop_tx),
            threads,
            counters,
            skipped: Vec::new(),
            worker_count: workers,
            output: cfg.output,
        })
    }

    pub(super) fn output(&self) -> &OutputSpec {
        &self.output
    }

    pub(super) fn position(&self) -> &Position {
        &self.batches.position
    }

    pub(super) fn next_batch(&mut self) -> Option<Result<Batch>> {
        let slot = self.batches.next(&self.counters)?;
        Some(slot.and_then(|slot| self.wrap(slot)))
    }

    pub(super) fn stats(&self) -> LoaderStats {
        self.counters.stats(self.worker_count)
    }

    pub(super) fn take_skipped(&mut self) -> Vec<SkippedRecord> {
        std::mem::take(&mut self.skipped)
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
        let (images, labels) = (slot.images.0.narrow(0, 0, n), slot.labels.0.narrow(0, 0, n));
        let batch = Batch::owned(images, labels, epoch, index, samples, skipped).with_lease(slot);
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

fn new_slot(
    batch: usize,
    out: &OutputSpec,
    pin: Option<Device>,
    free: Weak<Sender<Arc<Slot>>>,
) -> Result<Slot> {
    let images = out.empty_images(batch, Device::Cpu)?;
    let alloc = |what: &str, e: tch::TchError| Error::Alloc {
        what: format!("{what} of a batch of {batch}"),
        reason: e.to_string(),
    };
    let mut labels = Tensor::f_zeros([batch as i64], (Kind::Int64, Device::Cpu))
        .map_err(|e| alloc("the labels", e))?;
    let images = match pin {
        Some(device) => {
            if !tch::Cuda::is_available() {
                return Err(Error::Config("pinned batch memory needs a GPU".into()));
            }
            labels = labels
                .f_pin_memory(device)
                .map_err(|e| alloc("pinned labels", e))?;
            // pin_memory copies into page-locked memory, keeping the strides.
            images
                .f_pin_memory(device)
                .map_err(|e| alloc("pinned images", e))?
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
        free,
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
                // Without a decoder this worker can only report the failure, per record
                // (as the GPU path's CPU threads do).
                let reason = format!("the CPU JPEG decoder could not start: {e}");
                for task in self.tasks.iter() {
                    let e = self.record_error(task.sample.index as usize, &reason);
                    self.finish(task, Err(e));
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
        let record = self.cfg.read_record(self.source.as_ref(), index)?;
        let t1 = Instant::now();
        let (width, height) = if record.width > 0 && record.height > 0 {
            (record.width, record.height)
        } else {
            // TFRecords without image/width, image/height: read the JPEG header.
            s.decoder
                .header(&record.data)
                .map_err(|e| self.record_error(index, e))?
        };
        let crop = self
            .cfg
            .crop_plan(width, height, task.epoch, task.sample.index);
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
        job.error = Some(Error::AllRecordsFailed {
            epoch: job.epoch,
            batch: job.index,
        });
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
