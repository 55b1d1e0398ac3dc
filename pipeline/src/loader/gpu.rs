//! The GPU backend (feature `cuda`): the same sampler, plans and delivery as the CPU path,
//! with decoding on the GPU's JPEG engines and one fused augment kernel per batch. The GPU
//! parts it drives (nvJPEG handles, the kernel, device and pinned buffers) are in `gpu/`.
//!
//! ```text
//! planner thread   walks the sampler's batches, epoch after epoch, and hands whole
//!                  batches to the lanes (bounded: a lane takes one when it is free)
//! lane threads     (`lanes`, default 4) each with its own nvJPEG state, CUDA stream and
//!                  buffers: read records -> plan crops -> route each image (hardware
//!                  decoder, or CPU threads for what it cannot take) -> queue one batched
//!                  hardware decode on the lane's stream -> upload CPU-decoded images ->
//!                  allocate the output tensors -> queue the augment kernel -> record an
//!                  event; while the GPU works the lane starts its next batch
//! CPU threads      (`threads`) decode what the hardware does not take (progressive, CMYK,
//!                  failed hardware batches, the share `hardware_share` leaves them)
//! consumer         `next_batch` puts batches back in order and makes libtorch's stream
//!                  wait on the batch's event: no host synchronisation on the way
//! ```
//! Ordering against libtorch (which runs on the legacy default stream): output tensors
//! come from libtorch's caching allocator, whose blocks may still be read by queued
//! default-stream work, so a lane's stream waits on an event recorded on the default
//! stream after allocating; handing over, the default stream waits on the lane's event.
//! Decode arenas, parameters and staging buffers are per lane, grow-only, and reused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use convnets_formats::{Record, RecordSource};
use crossbeam::channel::{bounded, unbounded, Receiver, RecvTimeoutError, Sender};
use cudarc::driver::{result as cu, CudaContext, CudaEvent, CudaStream};
use tch::{Device, Kind, Tensor};

use super::shared::{
    lock, record_error, sampler_for, spawn, BadRecordPolicy, Batch, Counters, GpuOptions, InOrder,
    LoaderConfig, LoaderState, LoaderStats, Position, Sequenced, SkippedRecord, Transform,
};
use crate::cpu::decode::{CpuDecoder, DecodeLimits, RgbImage};
use crate::gpu::kernel::{AugmentKernel, SampleParams, SourceLayout};
use crate::gpu::memory::{DeviceBuffer, PinnedBuffer};
use crate::gpu::nvjpeg::{BatchDecoder, Library, Target};
use crate::output::{OutputDtype, OutputSpec, Span};
use crate::plan::CropWindow;
use crate::sampler::{sample_seed, PlannedBatch, Sample, Sampler};
use crate::{Error, Result};

const DEFAULT_LANES: usize = 4;
/// Decorrelates the hardware/CPU routing draw from the crop's.
const ROUTE_SALT: u64 = 0x6e76_6a70_6567_0001;

/// Images per second the H200's JPEG engines take (ImageNet-like JPEGs, 500x375 on
/// average), and one CPU thread's crop-aware decode of the same: `BENCHMARKS.md`.
const HARDWARE_IMAGES_PER_S: f64 = 26_000.0;
const CPU_THREAD_IMAGES_PER_S: f64 = 700.0;

/// The hardware decoder's share when none is given: the split that keeps the engines and
/// `cpu_threads` CPU decoders equally busy, estimated from measured rates (0.76 with 12
/// threads; near 1 on a machine with few cores).
fn auto_hardware_share(cpu_threads: usize) -> f64 {
    let cpu = cpu_threads as f64 * CPU_THREAD_IMAGES_PER_S;
    HARDWARE_IMAGES_PER_S / (HARDWARE_IMAGES_PER_S + cpu)
}

/// A uniform draw in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn cuda(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// A lane's finished batch: tensors being written on the lane's stream until `done`.
struct Finished {
    seq: u64,
    epoch: u64,
    index: usize,
    samples: Vec<Sample>,
    skipped: Vec<bool>,
    skipped_records: Vec<SkippedRecord>,
    result: Result<(Tensor, Tensor, CudaEvent)>,
}

impl Sequenced for Finished {
    fn seq(&self) -> u64 {
        self.seq
    }

    fn place(&self) -> (u64, usize) {
        (self.epoch, self.index)
    }
}

impl Finished {
    /// `job` with what became of it.
    fn new(
        job: PlannedBatch,
        skipped: Vec<bool>,
        skipped_records: Vec<SkippedRecord>,
        result: Result<(Tensor, Tensor, CudaEvent)>,
    ) -> Self {
        Self {
            seq: job.seq,
            epoch: job.epoch,
            index: job.index,
            samples: job.samples,
            skipped,
            skipped_records,
            result,
        }
    }

    /// Waits for the lane's work on the tensors before they go back to libtorch's
    /// allocator unused (loader shutdown, error batches).
    fn discard(self) {
        if let Ok((_, _, done)) = &self.result {
            let _ = done.synchronize();
        }
    }
}

pub(crate) struct GpuLoader {
    null_stream: Arc<CudaStream>,
    batches: InOrder<Finished>,
    stop: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    skipped: Vec<SkippedRecord>,
    output: OutputSpec,
    cpu_threads: usize,
    lane_bytes: Vec<Arc<AtomicU64>>,
    /// Upper bound of output batches alive at once (in lanes, queued, with the consumer).
    output_bytes: u64,
}

/// What the GPU loader's set-up decides once: how many lanes and CPU threads, and the
/// hardware decoder's share.
struct Sizing {
    lanes: usize,
    cpu_threads: usize,
    hardware_share: f64,
}

impl Sizing {
    fn new(cfg: &LoaderConfig, opts: &GpuOptions) -> Self {
        let lanes = if opts.lanes == 0 {
            DEFAULT_LANES
        } else {
            opts.lanes
        };
        // The lanes keep a core each busy feeding the hardware decoder.
        let cpu_threads = if cfg.threads == 0 {
            cfg.cores().saturating_sub(lanes).max(1)
        } else {
            cfg.threads
        };
        let hardware_share = opts
            .hardware_share
            .unwrap_or_else(|| auto_hardware_share(cpu_threads));
        Self {
            lanes,
            cpu_threads,
            hardware_share,
        }
    }
}

impl GpuLoader {
    pub fn new(
        source: Arc<dyn RecordSource>,
        cfg: LoaderConfig,
        opts: GpuOptions,
        state: LoaderState,
    ) -> Result<Self> {
        let sampler = sampler_for(source.as_ref(), &cfg, state)?;
        let batches_per_epoch = sampler.batches_per_epoch();
        check_config(&cfg, &opts)?;
        let ctx = open_device(opts.device)?;
        let kernel = Arc::new(AugmentKernel::compile(&ctx)?);
        // The hardware decoder is optional: without JPEG engines everything goes to the
        // CPU threads (and the stats say so).
        let library = if opts.hardware_share != Some(0.0) {
            Library::hardware().ok()
        } else {
            None
        };
        let sizing = Sizing::new(&cfg, &opts);
        let counters = Arc::new(Counters::default());
        let null_stream = ctx.default_stream();

        let (job_tx, job_rx) = bounded::<PlannedBatch>(1);
        let (ready_tx, ready_rx) = bounded::<Finished>(cfg.prefetch.max(1));
        let (cpu_tx, cpu_rx) = unbounded::<CpuJob>();
        let (stop_tx, stop_rx) = bounded::<()>(0);

        // Lanes are built here so that set-up errors reach the caller.
        let mut lanes = Vec::with_capacity(sizing.lanes);
        for _ in 0..sizing.lanes {
            lanes.push(Lane::new(
                &ctx,
                &source,
                &cfg,
                sizing.hardware_share,
                opts,
                library.clone(),
                kernel.clone(),
                cpu_tx.clone(),
                counters.clone(),
            )?);
        }
        drop(cpu_tx);
        let lane_bytes = lanes.iter().map(|lane| lane.bytes.clone()).collect();

        let mut threads = Vec::with_capacity(1 + sizing.lanes + sizing.cpu_threads);
        threads.push(spawn("gpu-loader-planner".into(), move || {
            plan_batches(sampler, state, job_tx, stop_rx)
        })?);
        for (i, lane) in lanes.into_iter().enumerate() {
            let (jobs, ready) = (job_rx.clone(), ready_tx.clone());
            threads.push(spawn(format!("gpu-loader-lane-{i}"), move || {
                lane.run(jobs, ready)
            })?);
        }
        let limits = DecodeLimits {
            max_pixels: cfg.max_pixels,
        };
        for i in 0..sizing.cpu_threads {
            let (jobs, counters) = (cpu_rx.clone(), counters.clone());
            threads.push(spawn(format!("gpu-loader-cpu-{i}"), move || {
                cpu_decode_worker(jobs, limits, counters)
            })?);
        }

        let batch = cfg.sampler.batch_size;
        let sample_bytes = cfg.output.sample_bytes() as u64 + 8;
        let output_bytes =
            (sizing.lanes + cfg.prefetch.max(1) + 2) as u64 * batch as u64 * sample_bytes;
        Ok(Self {
            null_stream,
            batches: InOrder::new(
                ready_rx,
                Position::new(state, batches_per_epoch),
                "GPU loader threads",
            ),
            stop: Some(stop_tx),
            threads,
            counters,
            skipped: Vec::new(),
            output: cfg.output,
            cpu_threads: sizing.cpu_threads,
            lane_bytes,
            output_bytes,
        })
    }

    pub fn output(&self) -> &OutputSpec {
        &self.output
    }

    pub fn position(&self) -> &Position {
        &self.batches.position
    }

    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        let finished = self.batches.next(&self.counters)?;
        Some(finished.and_then(|f| self.deliver(f)))
    }

    fn deliver(&mut self, f: Finished) -> Result<Batch> {
        let Finished {
            epoch,
            index,
            samples,
            skipped,
            mut skipped_records,
            result,
            ..
        } = f;
        let (images, labels, done) = result?;
        // libtorch's stream (the legacy default stream) waits for the lane's work.
        if let Err(e) = self.null_stream.wait(&done) {
            let _ = done.synchronize();
            return Err(cuda("ordering the batch before libtorch's work", e));
        }
        let n = samples.len() as u64;
        self.counters
            .skipped
            .fetch_add(skipped_records.len() as u64, Ordering::Relaxed);
        self.skipped.append(&mut skipped_records);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters.samples.fetch_add(n, Ordering::Relaxed);
        Ok(Batch::owned(images, labels, epoch, index, samples, skipped))
    }

    pub fn stats(&self) -> LoaderStats {
        let lanes: u64 = self
            .lane_bytes
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        self.counters
            .gpu_buffer_bytes
            .store(lanes + self.output_bytes, Ordering::Relaxed);
        self.counters.stats(self.cpu_threads)
    }

    pub fn take_skipped(&mut self) -> Vec<SkippedRecord> {
        std::mem::take(&mut self.skipped)
    }
}

impl Drop for GpuLoader {
    fn drop(&mut self) {
        // The planner stops and drops the job channel; lanes finish their batch and exit
        // (dropping the CPU job channel, which ends the CPU threads). Batches still on
        // the way are waited for before their memory goes back to libtorch.
        self.stop.take();
        for f in self.batches.take_held() {
            f.discard();
        }
        loop {
            match self.batches.ready().recv_timeout(Duration::from_millis(10)) {
                Ok(f) => f.discard(),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Refuses what the GPU path cannot do before any GPU work.
fn check_config(cfg: &LoaderConfig, opts: &GpuOptions) -> Result<()> {
    if let Some(share) = opts.hardware_share {
        if !(0.0..=1.0).contains(&share) {
            return Err(Error::Config(format!(
                "hardware share {share} is not between 0 and 1"
            )));
        }
    }
    if let Some(n) = &cfg.output.normalize {
        if !(n.mean.iter().all(|m| m.is_finite()) && n.std.iter().all(|s| s.is_normal())) {
            return Err(Error::Config(format!("bad normalisation {n:?}")));
        }
    }
    if cfg.output.dtype == OutputDtype::U8 && cfg.output.normalize.is_some() {
        return Err(Error::Config("u8 output cannot be normalised".into()));
    }
    Ok(())
}

/// The CUDA context of GPU `device`, bound to this thread, with cudarc's event tracking off.
fn open_device(device: usize) -> Result<Arc<CudaContext>> {
    if !tch::Cuda::is_available() {
        return Err(Error::Cuda(
            "libtorch sees no CUDA device (no GPU, no driver, or libtorch_cuda not linked)".into(),
        ));
    }
    let devices = tch::Cuda::device_count() as usize;
    if device >= devices {
        return Err(Error::Config(format!(
            "GPU {device} requested, {devices} visible"
        )));
    }
    let ctx = CudaContext::new(device).map_err(|e| cuda("opening the GPU", e))?;
    // Every buffer here is used on one stream, ordered by hand; cudarc's per-slice
    // event tracking would only add synchronisation.
    // SAFETY: no slices exist yet; ordering is handled as the module docs say.
    unsafe { ctx.disable_event_tracking() };
    ctx.bind_to_thread()
        .map_err(|e| cuda("binding the context", e))?;
    Ok(ctx)
}

fn plan_batches(
    sampler: Sampler,
    start: LoaderState,
    jobs: Sender<PlannedBatch>,
    stop: Receiver<()>,
) {
    for job in sampler.batches_from(start.epoch, start.batch) {
        crossbeam::select! {
            send(jobs, job) -> r => if r.is_err() { return },
            recv(stop) -> _ => return,
        }
    }
}

/// A CPU thread's answer: the sample's position in its batch, and the decoded image with
/// the crop window in its coordinates, or why not.
type CpuReply = (usize, std::result::Result<(RgbImage, CropWindow), String>);

/// An image for the CPU threads.
struct CpuJob {
    pos: usize,
    record: Record,
    crop: CropWindow,
    /// Train: decode only the crop (DCT-scaled); eval: the whole image.
    train: bool,
    out: (u32, u32),
    reply: Sender<CpuReply>,
}

fn cpu_decode_worker(jobs: Receiver<CpuJob>, limits: DecodeLimits, counters: Arc<Counters>) {
    let mut decoder = CpuDecoder::new(limits).ok();
    for job in jobs.iter() {
        let t = Instant::now();
        let mut image = RgbImage {
            width: 0,
            height: 0,
            data: Vec::new(),
        };
        let result = match decoder.as_mut() {
            None => Err("the CPU JPEG decoder could not start".to_string()),
            Some(d) if job.train => d
                .decode_for_crop(
                    &job.record.data,
                    &job.crop,
                    job.out.0,
                    job.out.1,
                    &mut image,
                )
                .map_err(|e| e.to_string()),
            Some(d) => d
                .decode_full(&job.record.data, &mut image)
                .map(|()| job.crop)
                .map_err(|e| e.to_string()),
        };
        counters
            .decode_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let _ = job
            .reply
            .send((job.pos, result.map(|window| (image, window))));
    }
}

/// Where a hardware-decoded image goes and which part of it the kernel reads.
#[derive(Clone, Copy)]
struct HwPlan {
    offset: usize,
    pitch: usize,
    plane: usize,
    x: Span,
    y: Span,
    roi: Option<(i32, i32, i32, i32)>,
}

/// One sample of the batch being built.
struct Planned {
    record: Option<Record>,
    crop: CropWindow,
    hw: Option<HwPlan>,
    cpu: Option<(RgbImage, CropWindow)>,
}

struct Lane {
    source: Arc<dyn RecordSource>,
    cfg: LoaderConfig,
    opts: GpuOptions,
    hardware_share: f64,
    stream: Arc<CudaStream>,
    null_stream: Arc<CudaStream>,
    decoder: Option<BatchDecoder>,
    kernel: Arc<AugmentKernel>,
    header: CpuDecoder,
    arena: DeviceBuffer,
    cpu_arena: DeviceBuffer,
    staging: PinnedBuffer<u8>,
    params_dev: DeviceBuffer,
    params_host: PinnedBuffer<SampleParams>,
    labels_host: PinnedBuffer<i64>,
    /// Host buffers are free again once this has completed.
    uploaded: Option<CudaEvent>,
    /// Timing events around the last batch's kernel, read once it has run.
    kernel_timing: Option<(CudaEvent, CudaEvent)>,
    cpu_jobs: Sender<CpuJob>,
    replies: (Sender<CpuReply>, Receiver<CpuReply>),
    counters: Arc<Counters>,
    bytes: Arc<AtomicU64>,
    /// Images sent to the CPU threads whose reply has not been taken (a batch that
    /// failed early leaves some; the next batch drains them).
    outstanding: usize,
    planned: Vec<Planned>,
}

impl Lane {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &Arc<CudaContext>,
        source: &Arc<dyn RecordSource>,
        cfg: &LoaderConfig,
        hardware_share: f64,
        opts: GpuOptions,
        library: Option<Arc<Library>>,
        kernel: Arc<AugmentKernel>,
        cpu_jobs: Sender<CpuJob>,
        counters: Arc<Counters>,
    ) -> Result<Self> {
        let batch = cfg.sampler.batch_size;
        let decoder = match library {
            Some(lib) => Some(BatchDecoder::new(lib, batch)?),
            None => None,
        };
        let stream = ctx.new_stream().map_err(|e| cuda("creating a stream", e))?;
        let header = CpuDecoder::new(DecodeLimits {
            max_pixels: cfg.max_pixels,
        })?;
        let lane = Self {
            source: source.clone(),
            cfg: cfg.clone(),
            opts,
            hardware_share,
            null_stream: ctx.default_stream(),
            decoder,
            kernel,
            header,
            // Room for a batch of 500 x 400 images; grows to what the data needs.
            arena: DeviceBuffer::new(ctx, batch * 500 * 400 * 3)?,
            cpu_arena: DeviceBuffer::new(ctx, 0)?,
            staging: PinnedBuffer::new(ctx, 0)?,
            params_dev: DeviceBuffer::new(ctx, batch * std::mem::size_of::<SampleParams>())?,
            params_host: PinnedBuffer::new(ctx, batch)?,
            labels_host: PinnedBuffer::new(ctx, batch)?,
            uploaded: None,
            kernel_timing: None,
            cpu_jobs,
            replies: unbounded(),
            counters,
            bytes: Arc::new(AtomicU64::new(0)),
            outstanding: 0,
            planned: Vec::with_capacity(batch),
            stream,
        };
        lane.account();
        Ok(lane)
    }

    fn account(&self) {
        let b = self.arena.len() + self.cpu_arena.len() + self.params_dev.len();
        self.bytes.store(b as u64, Ordering::Relaxed);
    }

    fn run(mut self, jobs: Receiver<PlannedBatch>, ready: Sender<Finished>) {
        // nvJPEG allocates through the runtime API, which needs the context current on
        // this thread (without it the first batch fails with an allocator error).
        if let Err(e) = self.stream.context().bind_to_thread() {
            for job in jobs.iter() {
                let n = job.samples.len();
                let e = cuda("binding the GPU context to a loader thread", e);
                let f = Finished::new(job, vec![false; n], Vec::new(), Err(e));
                if ready.send(f).is_err() {
                    break;
                }
            }
            return;
        }
        for job in jobs.iter() {
            let finished = self.process(job);
            if let Err(crossbeam::channel::SendError(f)) = ready.send(finished) {
                f.discard();
                break;
            }
        }
        // Nothing may still run on the stream when the buffers and decoder go.
        let _ = self.stream.synchronize();
    }

    fn process(&mut self, job: PlannedBatch) -> Finished {
        let n = job.samples.len();
        let mut batch = BatchOutcome {
            policy: self.cfg.on_bad_record,
            source: self.source.clone(),
            epoch: job.epoch,
            index: job.index,
            samples: &job.samples,
            skipped: vec![false; n],
            skipped_records: Vec::new(),
        };
        let result = self.build(&mut batch);
        if result.is_err() {
            // Whatever was queued for this batch finishes before its memory is reused.
            let _ = self.stream.synchronize();
        }
        self.account();
        let (skipped, skipped_records) = (batch.skipped, batch.skipped_records);
        Finished::new(job, skipped, skipped_records, result)
    }

    /// Reads, decodes and augments one batch; returns its tensors and the event after
    /// which they are complete.
    fn build(&mut self, batch: &mut BatchOutcome) -> Result<(Tensor, Tensor, CudaEvent)> {
        self.finish_previous()?;
        let n = batch.samples.len();
        let t0 = Instant::now();
        self.labels_host.reserve(n)?;
        let mut planned = std::mem::take(&mut self.planned);
        planned.clear();
        let routed = self.read_and_route(batch, &mut planned)?;
        let to_cpu = self.decode_on_hardware(&mut planned, routed)?;
        self.collect_cpu_images(batch, &mut planned, to_cpu)?;
        self.counters.decoded_cpu.fetch_add(
            planned.iter().filter(|p| p.cpu.is_some()).count() as u64,
            Ordering::Relaxed,
        );
        let t1 = Instant::now();
        self.counters.decode_ns.fetch_add(
            (t1 - t0).as_nanos() as u64 - routed.read_ns,
            Ordering::Relaxed,
        );
        self.upload_sources(batch, &planned)?;
        let result = self.launch_augment(n)?;
        self.counters
            .augment_ns
            .fetch_add(t1.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.planned = planned;
        Ok(result)
    }

    /// Before a batch reuses the lane's buffers: the previous upload has completed, its
    /// kernel's time is counted, and CPU replies a failed batch left behind are drained.
    fn finish_previous(&mut self) -> Result<()> {
        if let Some(ev) = self.uploaded.take() {
            ev.synchronize()
                .map_err(|e| cuda("waiting for the previous upload", e))?;
        }
        if let Some((start, end)) = self.kernel_timing.take() {
            if let Ok(ms) = start.elapsed_ms(&end) {
                self.counters
                    .augment_gpu_ns
                    .fetch_add((f64::from(ms) * 1e6) as u64, Ordering::Relaxed);
            }
        }
        while self.outstanding > 0 {
            self.outstanding -= 1;
            let _ = self.replies.1.recv();
        }
        Ok(())
    }

    /// Step 1: read each record, plan its crop and route it to the hardware decoder (a
    /// place in the arena) or to the CPU threads (sent now).
    fn read_and_route(
        &mut self,
        batch: &mut BatchOutcome,
        planned: &mut Vec<Planned>,
    ) -> Result<Routing> {
        let (epoch, samples) = (batch.epoch, batch.samples);
        let n = samples.len();
        let mut routed = Routing::default();
        for (pos, sample) in samples.iter().enumerate() {
            let index = sample.index as usize;
            let tr = Instant::now();
            let record = self.cfg.read_record(self.source.as_ref(), index);
            routed.read_ns += tr.elapsed().as_nanos() as u64;
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    batch.fail(pos, e)?;
                    planned.push(failed_plan());
                    continue;
                }
            };
            self.counters
                .bytes_read
                .fetch_add(record.data.len() as u64, Ordering::Relaxed);
            self.labels_host.slice_mut(n)[pos] = i64::from(record.label);
            let (w, h) = if record.width > 0 && record.height > 0 {
                (record.width, record.height)
            } else {
                match self.header.header(&record.data) {
                    Ok(wh) => wh,
                    Err(e) => {
                        batch.fail(pos, e)?;
                        planned.push(failed_plan());
                        continue;
                    }
                }
            };
            if u64::from(w) * u64::from(h) > self.cfg.max_pixels {
                let e = format!("{w}x{h} image has more than {} pixels", self.cfg.max_pixels);
                batch.fail(pos, e)?;
                planned.push(failed_plan());
                continue;
            }
            let crop = self.cfg.crop_plan(w, h, epoch, sample.index);
            // A fixed draw per (seed, epoch, record): the same images take the same path
            // whichever lane gets the batch, so a run repeats exactly.
            let to_hardware = self.hardware_share >= 1.0
                || unit(sample_seed(
                    self.cfg.sampler.seed ^ ROUTE_SALT,
                    epoch,
                    sample.index,
                )) < self.hardware_share;
            let hw = if to_hardware {
                self.hardware_plan(&record, w, h, &crop, &mut routed.arena_len)
            } else {
                None
            };
            if hw.is_none() {
                routed.to_cpu += 1;
                self.send_cpu(pos, record.clone(), crop)?;
            }
            planned.push(Planned {
                record: Some(record),
                crop,
                hw,
                cpu: None,
            });
        }
        self.counters
            .read_ns
            .fetch_add(routed.read_ns, Ordering::Relaxed);
        Ok(routed)
    }

    /// Step 2: one batched hardware decode on the lane's stream. A batch that fails twice
    /// goes to the CPU threads whole. Returns how many images the CPU threads decode.
    fn decode_on_hardware(&mut self, planned: &mut [Planned], routed: Routing) -> Result<usize> {
        let mut to_cpu = routed.to_cpu;
        let hw_count = planned.iter().filter(|p| p.hw.is_some()).count();
        if hw_count == 0 {
            return Ok(to_cpu);
        }
        self.arena.reserve(routed.arena_len, &self.stream)?;
        let base = self.arena.ptr();
        let targets: Vec<Target> = planned
            .iter()
            .filter_map(|p| {
                let (hw, rec) = (p.hw.as_ref()?, p.record.as_ref()?);
                let at = base + hw.offset as u64;
                Some(Target {
                    data: rec.data.as_ptr(),
                    len: rec.data.len(),
                    planes: [at, at + hw.plane as u64, at + 2 * hw.plane as u64],
                    pitch: hw.pitch,
                    roi: hw.roi,
                })
            })
            .collect();
        let decoder = self
            .decoder
            .as_mut()
            .expect("hardware plans need a decoder");
        let th = Instant::now();
        // SAFETY: the records' bytes live in `planned` until this returns; the planes
        // lie within the arena (reserved above for `arena_len` bytes, which
        // `hardware_plan` sized for every plane), which only this lane's stream uses.
        let mut status = unsafe { decoder.decode(&targets, self.stream.cu_stream().cast()) };
        if status.is_err() {
            // Once more with a freshly initialised state, before giving up on it.
            // SAFETY: the same targets as just above.
            status = unsafe { decoder.decode(&targets, self.stream.cu_stream().cast()) };
        }
        self.counters
            .hardware_ns
            .fetch_add(th.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(e) = status {
            // Which image failed is unknown: the CPU threads decode them all and
            // name the bad one, if any.
            self.counters
                .hardware_batch_failures
                .fetch_add(1, Ordering::Relaxed);
            *lock(&self.counters.hardware_last_error) = Some(e.to_string());
            for (pos, p) in planned.iter_mut().enumerate() {
                if p.hw.take().is_some() {
                    to_cpu += 1;
                    let record = p.record.clone().expect("hardware plans have records");
                    self.send_cpu(pos, record, p.crop)?;
                }
            }
        } else {
            self.counters
                .decoded_hardware
                .fetch_add(hw_count as u64, Ordering::Relaxed);
        }
        Ok(to_cpu)
    }

    /// Step 3: collect the `to_cpu` images the CPU threads decode.
    fn collect_cpu_images(
        &mut self,
        batch: &mut BatchOutcome,
        planned: &mut [Planned],
        to_cpu: usize,
    ) -> Result<()> {
        for _ in 0..to_cpu {
            let (pos, result) = self.replies.1.recv().map_err(|_| Error::Stopped {
                what: "GPU loader CPU threads",
            })?;
            self.outstanding -= 1;
            match result {
                Ok(image) => planned[pos].cpu = Some(image),
                Err(e) => batch.fail(pos, e)?,
            }
        }
        Ok(())
    }

    /// Step 4: upload the CPU-decoded images and the per-sample parameters; skipped
    /// samples repeat the batch's first good one, as on the CPU path.
    fn upload_sources(&mut self, batch: &mut BatchOutcome, planned: &[Planned]) -> Result<()> {
        let n = batch.samples.len();
        let cpu_len: usize = planned
            .iter()
            .filter_map(|p| p.cpu.as_ref())
            .map(|(img, _)| align(img.data.len(), 256))
            .sum();
        if cpu_len > 0 {
            self.cpu_arena.reserve(cpu_len, &self.stream)?;
            self.staging.reserve(cpu_len)?;
        }
        let staging = self.staging.slice_mut(cpu_len);
        self.params_host.reserve(n)?;
        let params = self.params_host.slice_mut(n);
        let out = self.cfg.output;
        let edges = self.cfg.transform.window_edges();
        let mut good = None;
        let mut cpu_off = 0usize;
        for (pos, p) in planned.iter().enumerate() {
            let sample = if let Some(hw) = &p.hw {
                let src = SourceLayout {
                    src: self.arena.ptr() + hw.offset as u64,
                    plane: hw.plane as i64,
                    xstride: 1,
                    pitch: hw.pitch as i32,
                };
                Some(SampleParams::new(src, hw.x, hw.y, &out, p.crop.flip))
            } else if let Some((img, window)) = &p.cpu {
                staging[cpu_off..cpu_off + img.data.len()].copy_from_slice(&img.data);
                let src = SourceLayout {
                    src: self.cpu_arena.ptr() + cpu_off as u64,
                    plane: 1,
                    xstride: 3,
                    pitch: img.width as i32 * 3,
                };
                cpu_off += align(img.data.len(), 256);
                let x = Span::new(window.x, window.width, img.width, edges);
                let y = Span::new(window.y, window.height, img.height, edges);
                match (x, y) {
                    (Some(x), Some(y)) => Some(SampleParams::new(src, x, y, &out, window.flip)),
                    _ => {
                        let e = format!(
                            "crop {window:?} lies outside the {}x{} image",
                            img.width, img.height
                        );
                        batch.fail(pos, e)?;
                        None
                    }
                }
            } else {
                None
            };
            match sample {
                Some(s) => {
                    params[pos] = s;
                    good.get_or_insert(pos);
                }
                None => batch.skipped[pos] = true,
            }
        }
        let Some(good) = good else {
            return Err(Error::AllRecordsFailed {
                epoch: batch.epoch,
                batch: batch.index,
            });
        };
        let labels = self.labels_host.slice_mut(n);
        for pos in 0..n {
            if batch.skipped[pos] {
                params[pos] = params[good];
                labels[pos] = labels[good];
            }
        }
        let stream = self.stream.cu_stream();
        // SAFETY: the pinned host buffers stay untouched until `uploaded` completes; the
        // device buffers are this lane's and ordered on its stream.
        unsafe {
            if cpu_len > 0 {
                cu::memcpy_htod_async(self.cpu_arena.ptr(), &staging[..cpu_len], stream)
                    .map_err(|e| cuda("uploading CPU-decoded images", e))?;
            }
            self.params_dev
                .reserve(n * std::mem::size_of::<SampleParams>(), &self.stream)?;
            cu::memcpy_htod_async(self.params_dev.ptr(), &params[..n], stream)
                .map_err(|e| cuda("uploading sample parameters", e))?;
        }
        Ok(())
    }

    /// Step 5: output tensors from libtorch's allocator, ordered after its queued work,
    /// then the augment kernel and the labels' upload on the lane's stream.
    fn launch_augment(&mut self, n: usize) -> Result<(Tensor, Tensor, CudaEvent)> {
        let out = self.cfg.output;
        let device = Device::Cuda(self.opts.device);
        let images = out.empty_images(n, device)?;
        let labels_dev =
            Tensor::f_empty([n as i64], (Kind::Int64, device)).map_err(|e| Error::Alloc {
                what: format!("the labels of a batch of {n} on {device:?}"),
                reason: e.to_string(),
            })?;
        let allocated = self
            .null_stream
            .record_event(None)
            .map_err(|e| cuda("recording an event", e))?;
        self.stream
            .wait(&allocated)
            .map_err(|e| cuda("ordering after libtorch's stream", e))?;
        let timing = || {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda("recording an event", e))
        };
        let kernel_start = timing()?;
        let labels = self.labels_host.slice_mut(n);
        // SAFETY: parameters and sources are on the device (queued on this stream above);
        // the tensors hold `n` samples and labels.
        unsafe {
            self.kernel.launch(
                &self.stream,
                self.params_dev.ptr(),
                n,
                images.data_ptr() as u64,
                &out,
            )?;
            cu::memcpy_htod_async(
                labels_dev.data_ptr() as u64,
                &labels[..n],
                self.stream.cu_stream(),
            )
            .map_err(|e| cuda("uploading labels", e))?;
        }
        self.kernel_timing = Some((kernel_start, timing()?));
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| cuda("recording an event", e))?;
        self.uploaded = Some(
            self.stream
                .record_event(None)
                .map_err(|e| cuda("recording an event", e))?,
        );
        Ok((images, labels_dev, done))
    }

    /// Decides whether the hardware decoder takes this image and, if so, where in the
    /// arena it goes.
    fn hardware_plan(
        &mut self,
        record: &Record,
        w: u32,
        h: u32,
        crop: &CropWindow,
        arena_len: &mut usize,
    ) -> Option<HwPlan> {
        let decoder = self.decoder.as_mut()?;
        let train = matches!(self.cfg.transform, Transform::Train(_));
        let edges = self.cfg.transform.window_edges();
        let x = Span::new(crop.x, crop.width, w, edges)?;
        let y = Span::new(crop.y, crop.height, h, edges)?;
        let roi = (train && self.opts.roi).then(|| {
            (
                x.lo as i32,
                y.lo as i32,
                (x.hi - x.lo) as i32,
                (y.hi - y.lo) as i32,
            )
        });
        if !decoder.supports(&record.data, roi).unwrap_or(false) {
            return None;
        }
        let (x, y, dw, dh) = match roi {
            // The decoded image is the region: spans start at its pixel (0, 0).
            Some((_, _, rw, rh)) => (shift(x), shift(y), rw as usize, rh as usize),
            None => (x, y, w as usize, h as usize),
        };
        let pitch = align(dw, 64);
        let plane = align(pitch * dh, 256);
        let offset = *arena_len;
        *arena_len += 3 * plane;
        Some(HwPlan {
            offset,
            pitch,
            plane,
            x,
            y,
            roi,
        })
    }

    fn send_cpu(&mut self, pos: usize, record: Record, crop: CropWindow) -> Result<()> {
        self.outstanding += 1;
        let job = CpuJob {
            pos,
            record,
            crop,
            train: matches!(self.cfg.transform, Transform::Train(_)),
            out: (self.cfg.output.width, self.cfg.output.height),
            reply: self.replies.0.clone(),
        };
        self.cpu_jobs.send(job).map_err(|_| Error::Stopped {
            what: "GPU loader CPU threads",
        })
    }
}

/// The batch a lane is building, and what became of its samples.
struct BatchOutcome<'a> {
    policy: BadRecordPolicy,
    source: Arc<dyn RecordSource>,
    epoch: u64,
    /// Index of the batch within its epoch.
    index: usize,
    samples: &'a [Sample],
    skipped: Vec<bool>,
    skipped_records: Vec<SkippedRecord>,
}

impl BatchOutcome<'_> {
    /// Sample `pos` cannot be produced because of `e`: the batch's error (policy `Error`),
    /// or skipped and reported (policy `Skip`). The error names the record's shard.
    fn fail(&mut self, pos: usize, e: impl std::fmt::Display) -> Result<()> {
        let sample = &self.samples[pos];
        let e = record_error(self.source.as_ref(), sample.index as usize, e);
        match self.policy {
            BadRecordPolicy::Error => Err(e),
            BadRecordPolicy::Skip => {
                self.skipped[pos] = true;
                let skipped = SkippedRecord::new(self.epoch, sample.index, &e);
                self.skipped_records.push(skipped);
                Ok(())
            }
        }
    }
}

/// What step 1 leaves for the next ones.
#[derive(Debug, Clone, Copy, Default)]
struct Routing {
    /// Bytes of arena the hardware-decoded images need.
    arena_len: usize,
    /// Images sent to the CPU threads.
    to_cpu: usize,
    /// Time spent reading records.
    read_ns: u64,
}

fn failed_plan() -> Planned {
    Planned {
        record: None,
        crop: CropWindow {
            x: 0.0,
            y: 0.0,
            width: 0.0,
            height: 0.0,
            flip: false,
        },
        hw: None,
        cpu: None,
    }
}

/// The span of a region-of-interest decode: the same window, counted from the region.
fn shift(s: Span) -> Span {
    Span {
        lo: 0,
        hi: s.hi - s.lo,
        in0: s.in0,
        in1: s.in1,
    }
}

fn align(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}
