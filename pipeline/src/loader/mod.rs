//! The loader: one rank's stream of batches of tch tensors, from a [`RecordSource`] and a
//! [`LoaderConfig`].
//!
//! [`Loader`] is a facade over two backends, picked by [`LoaderConfig::backend`]:
//! - `cpu.rs`: libjpeg-turbo decode and the CPU augmenter on worker threads, batches in
//!   host memory (optionally pinned);
//! - `gpu.rs` (feature `cuda`): nvJPEG on the GPU's JPEG engines (CPU threads for what they
//!   cannot take) and one fused augment kernel per batch, batches in GPU memory.
//!
//! Both build on `shared.rs`: the configuration, the sampler and crop plans, [`LoaderState`],
//! the bad-record policy, [`Batch`] and in-order delivery; the backends import from it and
//! never from each other. Per-sample randomness comes from (seed, epoch, record index), so
//! batches do not depend on the number of threads or on scheduling, and a loader started
//! from a saved [`LoaderState`] continues exactly.
//!
//! ```no_run
//! use std::sync::Arc;
//! use convnets_formats::{Dataset, RecordSource};
//! use convnets_pipeline::{Loader, LoaderConfig, LoaderState};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let split: Arc<dyn RecordSource> = Arc::new(Dataset::open("data/imagenet")?.split("train")?);
//! let mut loader = Loader::new(split, LoaderConfig::default(), LoaderState::default())?;
//! while let Some(batch) = loader.next_batch() {
//!     let batch = batch?; // images [B, 3, 224, 224] f32, labels [B] i64
//!     println!("batch {} of epoch {}: {:?}", batch.index, batch.epoch, batch.images.size());
//! }
//! let resume_at = loader.state(); // save it; `Loader::new(.., resume_at)` continues here
//! # Ok(()) }
//! ```

mod cpu;
#[cfg(feature = "cuda")]
mod gpu;
mod presets;
mod shared;

use std::sync::Arc;

use convnets_formats::RecordSource;

pub use presets::{training_hardware_share, Crops, CPU_THREAD_DECODES_PER_S};
pub use shared::{
    check_threads, core_share, Backend, BadRecordPolicy, Batch, GpuOptions, LoaderConfig,
    LoaderState, LoaderStats, SkippedRecord, Transform, MAX_THREADS_PER_CORE,
};

use crate::output::OutputSpec;
use crate::Result;
use cpu::CpuLoader;
#[cfg(feature = "cuda")]
use gpu::GpuLoader;
use shared::Position;

/// The loader of one rank. Threads start in `new` and are joined on drop.
pub struct Loader {
    inner: Inner,
}

/// The backend behind the facade.
enum Inner {
    Cpu(CpuLoader),
    #[cfg(feature = "cuda")]
    Gpu(GpuLoader),
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
            Backend::Gpu(gpu) => Inner::Gpu(GpuLoader::new(source, cfg, gpu, state)?),
            #[cfg(not(feature = "cuda"))]
            Backend::Gpu(_) => {
                return Err(crate::Error::BuiltWithoutCuda {
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

    /// What each sample of a batch looks like.
    pub fn output(&self) -> &OutputSpec {
        match &self.inner {
            Inner::Cpu(l) => l.output(),
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
            Inner::Cpu(l) => l.stats(),
            #[cfg(feature = "cuda")]
            Inner::Gpu(l) => l.stats(),
        }
    }

    /// Records skipped in the batches returned so far (skip policy), emptied by the call.
    pub fn take_skipped(&mut self) -> Vec<SkippedRecord> {
        match &mut self.inner {
            Inner::Cpu(l) => l.take_skipped(),
            #[cfg(feature = "cuda")]
            Inner::Gpu(l) => l.take_skipped(),
        }
    }

    fn position(&self) -> &Position {
        match &self.inner {
            Inner::Cpu(l) => l.position(),
            #[cfg(feature = "cuda")]
            Inner::Gpu(l) => l.position(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The CPU backend on an in-memory split (the end-to-end tests over real shards are in
    //! the workspace's `tests/loader.rs`).

    use std::path::PathBuf;

    use convnets_formats::{Record, RecordMeta};
    use jpeg_encoder::{ColorType, Encoder};

    use super::*;
    use crate::output::{Layout, OutputDtype};
    use crate::plan::CenterCrop;
    use crate::sampler::SamplerConfig;
    use crate::Error;

    /// Records `0..len`, labelled by index; those in `broken` are not JPEGs. Records at
    /// `len / 2` and above cannot be located when `unlocated` is set.
    struct Memory {
        jpeg: Vec<u8>,
        len: usize,
        broken: Vec<usize>,
        unlocated: bool,
    }

    impl Memory {
        fn new(len: usize, broken: Vec<usize>) -> Self {
            let (w, h) = (40u16, 30u16);
            let rgb: Vec<u8> = (0..usize::from(w) * usize::from(h) * 3)
                .map(|i| (i % 251) as u8)
                .collect();
            let mut jpeg = Vec::new();
            Encoder::new(&mut jpeg, 90)
                .encode(&rgb, w, h, ColorType::Rgb)
                .unwrap();
            Self {
                jpeg,
                len,
                broken,
                unlocated: false,
            }
        }
    }

    impl RecordSource for Memory {
        fn len(&self) -> usize {
            self.len
        }

        fn meta(&self, i: usize) -> convnets_formats::Result<RecordMeta> {
            Ok(RecordMeta {
                label: i as u32,
                width: 40,
                height: 30,
                len: self.jpeg.len() as u32,
            })
        }

        fn record(&self, i: usize) -> convnets_formats::Result<Record> {
            let data = if self.broken.contains(&i) {
                b"not a JPEG".to_vec()
            } else {
                self.jpeg.clone()
            };
            Ok(Record {
                data: data.into(),
                label: i as u32,
                width: 40,
                height: 30,
            })
        }

        fn locate(&self, i: usize) -> convnets_formats::Result<(PathBuf, u64)> {
            if self.unlocated && i >= self.len / 2 {
                return Err(convnets_formats::Error::Io {
                    path: PathBuf::from("memory"),
                    error: std::io::Error::other("no shard"),
                });
            }
            Ok((PathBuf::from("memory.cnr"), i as u64))
        }
    }

    fn config(batch_size: usize, on_bad_record: BadRecordPolicy) -> LoaderConfig {
        LoaderConfig {
            sampler: SamplerConfig {
                batch_size,
                ..SamplerConfig::default()
            },
            transform: Transform::Eval(CenterCrop::for_crop(16)),
            output: OutputSpec {
                width: 16,
                height: 16,
                dtype: OutputDtype::U8,
                layout: Layout::Nhwc,
                normalize: None,
            },
            threads: 2,
            on_bad_record,
            ..LoaderConfig::default()
        }
    }

    #[test]
    fn two_epochs_deliver_every_record_once_each_and_resume_exactly() -> Result<()> {
        let source: Arc<dyn RecordSource> = Arc::new(Memory::new(12, Vec::new()));
        let mut loader = Loader::new(
            source.clone(),
            config(4, BadRecordPolicy::Error),
            LoaderState::default(),
        )?;
        assert_eq!(loader.batches_per_epoch(), 3);
        let mut labels = Vec::new();
        for epoch in 0..2 {
            let mut seen = Vec::new();
            while let Some(batch) = loader.next_batch() {
                let batch = batch?;
                assert_eq!(
                    (batch.epoch, batch.images.size()),
                    (epoch, vec![4, 3, 16, 16])
                );
                seen.extend(Vec::<i64>::try_from(&batch.labels).unwrap());
                labels.push(Vec::<i64>::try_from(&batch.labels).unwrap());
            }
            seen.sort();
            assert_eq!(seen, (0..12).collect::<Vec<i64>>(), "epoch {epoch}");
        }
        // A batch kept past its loader stays valid, and dropping it then is harmless.
        let kept = loader.next_batch().expect("epoch 2")?;
        let state = loader.state();
        drop(loader);
        assert_eq!(kept.len(), 4);
        drop(kept);

        let mut resumed = Loader::new(source, config(4, BadRecordPolicy::Error), state)?;
        let next = resumed.next_batch().expect("batch 1 of epoch 2")?;
        assert_eq!((next.epoch, next.index), (2, 1));
        Ok(())
    }

    #[test]
    fn skipped_records_are_replaced_and_listed() -> Result<()> {
        let source = Arc::new(Memory::new(8, vec![1, 6]));
        let mut cfg = config(8, BadRecordPolicy::Skip);
        cfg.sampler.shuffle = false;
        let mut loader = Loader::new(source, cfg, LoaderState::default())?;
        let batch = loader.next_batch().expect("one batch")?;
        let skipped: Vec<usize> = (0..8).filter(|&i| batch.skipped[i]).collect();
        assert_eq!(skipped, [1, 6]);
        let labels = Vec::<i64>::try_from(&batch.labels).unwrap();
        assert_eq!(
            labels,
            [0, 0, 2, 3, 4, 5, 0, 7],
            "the first good sample fills in"
        );
        drop(batch);
        let listed = loader.take_skipped();
        assert_eq!(listed.len(), 2);
        assert!(listed
            .iter()
            .all(|s| s.shard == std::path::Path::new("memory.cnr")));
        assert_eq!(loader.stats().skipped, 2);
        Ok(())
    }

    #[test]
    fn runtime_failures_have_their_own_errors() -> Result<()> {
        let mut cfg = config(4, BadRecordPolicy::Skip);
        cfg.sampler.shuffle = false;
        let source = Arc::new(Memory::new(8, vec![4, 5, 6, 7]));
        let mut loader = Loader::new(source, cfg.clone(), LoaderState::default())?;
        loader.next_batch().expect("batch 0")?;
        match loader.next_batch().expect("batch 1") {
            Err(Error::AllRecordsFailed { epoch: 0, batch: 1 }) => {}
            other => panic!("{:?}", other.map(|b| b.index)),
        }

        cfg.on_bad_record = BadRecordPolicy::Error;
        let mut source = Memory::new(8, vec![5]);
        source.unlocated = true;
        let mut loader = Loader::new(Arc::new(source), cfg, LoaderState::default())?;
        loader.next_batch().expect("batch 0")?;
        match loader.next_batch().expect("batch 1") {
            Err(Error::RecordIndex { index: 5, .. }) => {}
            other => panic!("{:?}", other.map(|b| b.index)),
        }
        Ok(())
    }
}
