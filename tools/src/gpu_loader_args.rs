//! The GPU loader's flags, shared by `train`, `eval` and `bench`.

use clap::Args;
use convnets_pipeline::loader::GpuOptions;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Args, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuLoaderArgs {
    /// GPU loader: batches decoded at once, each with its own nvJPEG state and CUDA stream.
    #[arg(long, default_value_t = 4)]
    pub gpu_lanes: usize,
    /// GPU loader: share of the JPEGs the hardware decoder can take that it gets (the rest
    /// go to the CPU threads), like DALI's hw_decoder_load. Default for training (`train`,
    /// `bench e2e`): the CPU threads take what they can of what the model consumes and the
    /// engines the rest (0 for resnet50 with 16 threads), as the engines' work slows the
    /// model; otherwise a split that keeps both busy (about 0.76 with 16 cores).
    #[arg(long)]
    pub hw_decoder_load: Option<f64>,
    /// GPU loader: decode whole images, not only the crop's region.
    #[arg(long)]
    pub no_roi: bool,
}

impl Default for GpuLoaderArgs {
    fn default() -> Self {
        Self {
            gpu_lanes: 4,
            hw_decoder_load: None,
            no_roi: false,
        }
    }
}

impl GpuLoaderArgs {
    pub fn options(&self, device: usize) -> GpuOptions {
        GpuOptions {
            device,
            lanes: self.gpu_lanes,
            hardware_share: self.hw_decoder_load,
            roi: !self.no_roi,
        }
    }
}
