//! ResNet-family models in tch; weights interchangeable with torchvision/timm.
//!
//! - [`resnet`]: ResNet-18/34/50/101/152 (v1.5), ResNeXt-101 32x4d, SE-ResNeXt-101 32x4d as
//!   [`ResNet`] (a [`tch::nn::ModuleT`]), built under an `nn::Path` with torchvision/timm names.
//! - [`registry`]: `--arch` names to constructors ([`Arch`], [`registry::build`]).
//! - [`weights`]: strict safetensors load/save ([`weights::load_safetensors`],
//!   [`weights::save_safetensors`]; [`weights::load_tensors_except`] leaves named tensors out,
//!   e.g. the classifier when fine-tuning onto another class count).
//! - [`init`]: the initialisation recipe; [`layout`]: channels_last (NHWC) helpers.
//!
//! ```no_run
//! # fn main() -> Result<(), convnets_models::Error> {
//! use convnets_models::{registry, weights, MemoryFormat, ModelConfig};
//! use tch::{nn::VarStore, Device, Kind, Tensor};
//!
//! let device = Device::cuda_if_available();
//! let vs = VarStore::new(device);
//! let cfg = ModelConfig { memory_format: MemoryFormat::ChannelsLast, ..ModelConfig::default() };
//! let model = registry::build("resnet50", &vs.root(), 1000, &cfg)?;
//! // A file from `safetensors.torch.save_file(torchvision.models.resnet50().state_dict(), ...)`.
//! weights::load_safetensors(&vs, "resnet50.safetensors")?;
//! let images = Tensor::f_zeros([8, 3, 224, 224], (Kind::Float, device))?;
//! let logits = tch::autocast(true, || model.f_forward_t(&images, false))?;
//! assert_eq!(logits.size(), [8, 1000]);
//! weights::save_safetensors(&vs, "resnet50-ours.safetensors")?;
//! # Ok(())
//! # }
//! ```

pub mod error;
pub mod init;
pub mod layout;
pub mod registry;
pub mod resnet;
pub mod weights;

pub use error::{Error, Mismatch, MismatchReport, Result};
pub use layout::MemoryFormat;
pub use registry::{Arch, ARCH_NAMES};
pub use resnet::{BlockKind, ModelConfig, ResNet, ResNetSpec};

/// Number of trainable parameters in `vs` (what `sum(p.numel() for p in model.parameters())`
/// gives in PyTorch; BN buffers are not counted).
pub fn num_parameters(vs: &tch::nn::VarStore) -> usize {
    vs.trainable_variables()
        .iter()
        .map(tch::Tensor::numel)
        .sum()
}
