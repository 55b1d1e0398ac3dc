//! The loader configurations of the commands (`train`, `eval`, `bench loader`, `bench
//! e2e`) from one constructor: the crops and the sampler that go together, the output
//! spec; each command then sets its backend, threads and the like.

use convnets_pipeline::cpu::augment::{Layout, OutputDtype, OutputSpec};
use convnets_pipeline::loader::{LoaderConfig, Transform};
use convnets_pipeline::plan::{CenterCrop, RandomResizedCrop};
use convnets_pipeline::sampler::{LastBatch, SamplerConfig};

/// Which transform and sampling a loader runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crops {
    /// RandomResizedCrop, shuffled, the last incomplete batch dropped.
    Train,
    /// Resize + CenterCrop (torchvision's eval transform), in order, every image once.
    Eval,
}

/// A CPU loader of `batch_size` images of `image_size` x `image_size`, normalised with
/// ImageNet's mean and std unless they are `u8`.
pub fn loader_config(
    crops: Crops,
    batch_size: usize,
    image_size: u32,
    dtype: OutputDtype,
    layout: Layout,
) -> LoaderConfig {
    let eval = crops == Crops::Eval;
    LoaderConfig {
        sampler: SamplerConfig {
            shuffle: !eval,
            batch_size,
            last_batch: if eval {
                LastBatch::Partial
            } else {
                LastBatch::Drop
            },
            ..SamplerConfig::default()
        },
        transform: if eval {
            Transform::Eval(CenterCrop::for_crop(image_size))
        } else {
            Transform::Train(RandomResizedCrop::default())
        },
        output: OutputSpec {
            width: image_size,
            height: image_size,
            dtype,
            layout,
            normalize: (dtype != OutputDtype::U8).then(Default::default),
        },
        ..LoaderConfig::default()
    }
}
