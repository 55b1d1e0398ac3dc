//! The configurations `convnets train`/`eval`/`bench` and the Python package start from,
//! so that every front end loads the same way: the crops and the sampling that go
//! together, and the JPEG engines' share of the decoding for training.

use super::shared::LoaderConfig;
use super::shared::Transform;
use crate::output::{Layout, OutputDtype, OutputSpec};
use crate::plan::{CenterCrop, RandomResizedCrop};
use crate::sampler::{LastBatch, SamplerConfig};

/// Which transform and sampling a loader runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crops {
    /// RandomResizedCrop + flip, shuffled, the last incomplete batch dropped.
    Train,
    /// Resize + CenterCrop (torchvision's eval transform), in order, every image once.
    Eval,
}

impl LoaderConfig {
    /// A CPU loader of `batch_size` images of `image_size` x `image_size`, normalised with
    /// ImageNet's mean and std unless they are `u8`; the caller then sets the backend,
    /// threads, rank and the like.
    pub fn preset(
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
}

/// JPEGs one CPU thread decodes per second for training (500x375 ImageNet-like images,
/// ROI decode; measured on the H200 machine's cores, BENCHMARKS.md).
pub const CPU_THREAD_DECODES_PER_S: f64 = 700.0;

/// The GPU loader's hardware-decoder share for training when none is given: the CPU
/// threads take what they can of what the model consumes (`model_images_per_s`), the JPEG
/// engines the rest. Decoding on the engines slows the model's own kernels (on an H200
/// with 16 threads per GPU, resnet50 trained at 0.97 of compute speed with the loader's
/// throughput-balanced share of 0.70 and at 0.995 with 0; on 2 GPUs 0.90 and 0.97), while
/// CPU threads do not. CPU threads are counted at 80 % of their measured rate.
pub fn training_hardware_share(cpu_threads: usize, model_images_per_s: f64) -> f64 {
    let cpu = 0.8 * CPU_THREAD_DECODES_PER_S * cpu_threads as f64;
    (1.0 - cpu / model_images_per_s).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_take_only_what_the_threads_cannot() {
        // resnet50 on an H200: 16 threads carry it all, 8 leave about a quarter.
        assert_eq!(training_hardware_share(16, 6_100.0), 0.0);
        let eight = training_hardware_share(8, 6_100.0);
        assert!((eight - (1.0 - 4_480.0 / 6_100.0)).abs() < 1e-12, "{eight}");
        assert_eq!(training_hardware_share(0, 6_100.0), 1.0);
    }

    #[test]
    fn presets_pair_crops_with_their_sampling() {
        let train = LoaderConfig::preset(Crops::Train, 32, 64, OutputDtype::F16, Layout::Nhwc);
        assert!(train.sampler.shuffle);
        assert_eq!(train.sampler.last_batch, LastBatch::Drop);
        assert!(matches!(train.transform, Transform::Train(_)));
        let eval = LoaderConfig::preset(Crops::Eval, 32, 64, OutputDtype::U8, Layout::Nchw);
        assert!(!eval.sampler.shuffle);
        assert_eq!(eval.sampler.last_batch, LastBatch::Partial);
        assert!(matches!(eval.transform, Transform::Eval(_)));
        assert!(eval.output.normalize.is_none());
    }
}
