//! Memory layout: NCHW ("contiguous") or NHWC ("channels_last") storage for 4-D tensors.
//!
//! tch has no `memory_format` argument, so channels_last is made the way PyTorch's
//! `x.contiguous(memory_format=torch.channels_last)` lays it out: permute to NHWC, make that
//! contiguous, permute back. The shape stays `[N, C, H, W]`; only the strides change, and cuDNN
//! picks the NHWC kernels (the fast ones for fp16 tensor cores) from the strides.

use tch::nn::VarStore;
use tch::{no_grad, Tensor};

use crate::error::{Error, Result};

/// How 4-D weights and activations are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryFormat {
    /// NCHW, PyTorch's default.
    #[default]
    Contiguous,
    /// NHWC memory with NCHW shape (`torch.channels_last`).
    ChannelsLast,
}

impl MemoryFormat {
    /// What a model on `device` should use: channels_last on a GPU (cuDNN's NHWC kernels,
    /// tensor cores), NCHW on the CPU.
    pub fn for_device(device: tch::Device) -> Self {
        if device.is_cuda() {
            MemoryFormat::ChannelsLast
        } else {
            MemoryFormat::Contiguous
        }
    }
}

/// The strides PyTorch gives a channels_last tensor of this 4-D shape.
fn channels_last_strides(size: &[i64]) -> [i64; 4] {
    let (c, h, w) = (size[1], size[2], size[3]);
    [h * w * c, 1, w * c, c]
}

/// True when `x` is 4-D with exactly the strides `contiguous(memory_format=channels_last)` gives.
///
/// Exact strides matter: for a `[O, I, 1, 1]` weight both layouts are "contiguous", but PyTorch's
/// layout heuristic (`suggest_memory_format`) only reads the channels_last strides as NHWC.
pub fn is_channels_last(x: &Tensor) -> bool {
    let size = x.size();
    size.len() == 4 && x.stride() == channels_last_strides(&size)
}

/// `x` with NHWC memory (same shape, values and autograd history); no copy if it already is.
pub fn to_channels_last(x: &Tensor) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 {
        return Err(Error::NotFourDimensional { shape: size });
    }
    if is_channels_last(x) {
        return Ok(x.shallow_clone());
    }
    // `permute -> contiguous -> permute` (DEVICE.md) leaves tensors with size-1 dims, such as
    // 1x1 conv weights, with their NCHW strides; copying into explicit strides does not.
    let mut out =
        Tensor::f_empty_strided(&size, channels_last_strides(&size), (x.kind(), x.device()))?;
    out.f_copy_(x)?;
    Ok(out)
}

/// `x` in the requested layout (a no-op for [`MemoryFormat::Contiguous`] if it already is).
pub fn to_memory_format(x: &Tensor, format: MemoryFormat) -> Result<Tensor> {
    match format {
        MemoryFormat::ChannelsLast => to_channels_last(x),
        MemoryFormat::Contiguous => Ok(x.f_contiguous()?),
    }
}

/// Re-lays out every 4-D tensor of `vs` (conv weights) in place, keeping identities.
///
/// The model's handles share the var store's tensors, so they see the new strides; optimizer
/// state created afterwards follows them. Use it after `VarStore::set_device` if the model was
/// built with another layout than the one wanted on the device (`to_device` keeps strides, so
/// building with channels_last on the CPU and moving to CUDA also works).
pub fn convert_var_store(vs: &VarStore, format: MemoryFormat) -> Result<()> {
    for (_name, mut var) in vs.variables() {
        if var.dim() != 4 {
            continue;
        }
        let relaid = no_grad(|| to_memory_format(&var, format))?;
        var.f_set_data(&relaid)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn channels_last_keeps_shape_and_values() -> Result<()> {
        let x =
            Tensor::f_arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu))?.f_view([2, 3, 4, 5])?;
        assert!(!is_channels_last(&x));
        let y = to_channels_last(&x)?;
        assert_eq!(y.size(), vec![2, 3, 4, 5]);
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(is_channels_last(&y));
        assert!(y.f_equal(&x)?);
        // Already NHWC: no copy.
        let z = to_channels_last(&y)?;
        assert_eq!(z.data_ptr(), y.data_ptr());
        let back = to_memory_format(&y, MemoryFormat::Contiguous)?;
        assert_eq!(back.stride(), vec![60, 20, 5, 1]);
        Ok(())
    }

    #[test]
    fn one_by_one_weights_get_pytorch_strides() -> Result<()> {
        let w = Tensor::f_zeros([8, 4, 1, 1], (Kind::Float, Device::Cpu))?;
        assert!(!is_channels_last(&w));
        assert_eq!(to_channels_last(&w)?.stride(), vec![4, 1, 4, 4]);
        Ok(())
    }

    #[test]
    fn rejects_other_ranks() {
        let x = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        assert!(matches!(
            to_channels_last(&x),
            Err(Error::NotFourDimensional { .. })
        ));
    }
}
