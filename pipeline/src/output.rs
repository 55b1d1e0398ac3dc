//! What a loader produces, whichever backend makes it: the output sample's size, element
//! type, layout and normalisation ([`OutputSpec`]), how the resampling filter treats the
//! crop window's edges ([`WindowEdges`]), and the per-axis source spans both augmenters
//! (the CPU's and the GPU kernel) read. Re-exported from [`crate::cpu::augment`], where
//! these types used to live.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How far a crop edge may stray from the image, or from a pixel boundary, and still be
/// taken as lying on it (float noise in planned windows).
const EDGE_SLACK: f64 = 1e-6;

/// Element type of the output tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputDtype {
    /// Resampled pixel values 0..=255, not normalised.
    U8,
    F16,
    /// bfloat16 (8 exponent bits, like f32), rounded to nearest even.
    Bf16,
    F32,
}

impl OutputDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutputDtype::U8 => 1,
            OutputDtype::F16 | OutputDtype::Bf16 => 2,
            OutputDtype::F32 => 4,
        }
    }

    /// The tch element type of a batch of this dtype.
    pub(crate) fn kind(self) -> Kind {
        match self {
            OutputDtype::U8 => Kind::Uint8,
            OutputDtype::F16 => Kind::Half,
            OutputDtype::Bf16 => Kind::BFloat16,
            OutputDtype::F32 => Kind::Float,
        }
    }
}

/// Memory layout of one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// Planar: all R, then all G, then all B (PyTorch's default).
    Nchw,
    /// Interleaved RGBRGB..., as decoded (channels-last).
    Nhwc,
}

/// Per-channel normalisation `(x / 255 - mean) / std`, RGB order.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Normalize {
    /// The ImageNet statistics torchvision's reference scripts use.
    fn default() -> Self {
        Self {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

/// What one output sample looks like.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Element type.
    pub dtype: OutputDtype,
    /// Planar or interleaved channels.
    pub layout: Layout,
    /// `Some`: `(x / 255 - mean) / std`; `None`: `x / 255` for float outputs (torchvision's
    /// `ToTensor` alone) and the raw 0..=255 values for `U8`, which admits only `None`.
    pub normalize: Option<Normalize>,
}

impl Default for OutputSpec {
    /// 224 x 224, f32, NCHW, ImageNet-normalised: what torchvision's training recipe feeds.
    fn default() -> Self {
        Self {
            width: 224,
            height: 224,
            dtype: OutputDtype::F32,
            layout: Layout::Nchw,
            normalize: Some(Normalize::default()),
        }
    }
}

impl OutputSpec {
    /// Bytes of one sample: `width * height * 3 * dtype size`.
    pub fn sample_bytes(&self) -> usize {
        (self.width as usize)
            .saturating_mul(self.height as usize)
            .saturating_mul(3 * self.dtype.size())
    }

    /// Per-channel `(scale, offset)` with `out = v * scale + offset` for a `u8` level `v`:
    /// `(v / 255 - mean) / std == v * (1 / (255 std)) + (-mean / std)`.
    pub fn scale_offset(&self) -> ([f32; 3], [f32; 3]) {
        let (mut s, mut o) = ([1.0f32 / 255.0; 3], [0.0f32; 3]);
        if let Some(norm) = &self.normalize {
            for c in 0..3 {
                let std = f64::from(norm.std[c]);
                s[c] = (1.0 / (255.0 * std)) as f32;
                o[c] = (-f64::from(norm.mean[c]) / std) as f32;
            }
        }
        (s, o)
    }

    /// An uninitialised `[batch, 3, H, W]` image tensor on `device` in this spec's dtype and
    /// layout: `Nhwc` is NHWC memory seen through an NCHW shape (channels_last), as
    /// PyTorch does. Both loaders allocate their batches here; a failed allocation is an
    /// error naming the batch and its bytes.
    pub(crate) fn empty_images(&self, batch: usize, device: Device) -> crate::Result<Tensor> {
        let (b, h, w) = (batch as i64, i64::from(self.height), i64::from(self.width));
        let kind = self.dtype.kind();
        match self.layout {
            Layout::Nchw => Tensor::f_empty([b, 3, h, w], (kind, device)),
            Layout::Nhwc => Tensor::f_empty([b, h, w, 3], (kind, device))
                .and_then(|t| t.f_permute([0, 3, 1, 2])),
        }
        .map_err(|e| crate::Error::Alloc {
            what: format!(
                "a batch of {batch} images of {}x{} ({} bytes) on {device:?}",
                self.width,
                self.height,
                batch * self.sample_bytes()
            ),
            reason: e.to_string(),
        })
    }
}

/// What the resampling filter does at the crop window's edges. The two match the two
/// ways torchvision combines a crop with a resize; they differ only in output pixels
/// whose filter reaches across the window's edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowEdges {
    /// The filter stops at the window (its pixel span, for fractional edges), as if the
    /// window had been cropped out first and then resized: torchvision's
    /// `RandomResizedCrop` / `F.resized_crop`. For the training path.
    #[default]
    Crop,
    /// The filter reads on into the rest of the image, as if the whole image had been
    /// resized and the window cut from the result: torchvision's `Resize` +
    /// `CenterCrop`, i.e. windows from [`CenterCrop::plan`](crate::plan::CenterCrop::plan),
    /// and Pillow's `resize(size, box=window)`. For the evaluation path.
    Image,
}

/// One axis of a crop: the source pixels `lo..hi` the filter may read, and the window
/// `in0..in1` in coordinates relative to `lo` (Pillow's `box`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    pub lo: usize,
    pub hi: usize,
    pub in0: f64,
    pub in1: f64,
}

impl Span {
    /// `None` if the window `start..start + len` is empty, not finite or outside `0..size`.
    pub(crate) fn new(start: f64, len: f64, size: u32, edges: WindowEdges) -> Option<Span> {
        let size = f64::from(size);
        let end = start + len;
        if !(start.is_finite() && len.is_finite() && len > 0.0)
            || start < -EDGE_SLACK
            || end > size + EDGE_SLACK
        {
            return None;
        }
        let (start, end) = (snap(start).max(0.0), snap(end).min(size));
        if end <= start {
            return None;
        }
        let (lo, hi) = match edges {
            // The pixels the window covers, whole.
            WindowEdges::Crop => (start.floor(), end.ceil()),
            WindowEdges::Image => (0.0, size),
        };
        Some(Span {
            lo: lo as usize,
            hi: hi as usize,
            in0: start - lo,
            in1: end - lo,
        })
    }

    pub(crate) fn len(&self) -> f64 {
        self.in1 - self.in0
    }
}

/// `v`, or the integer it is within [`EDGE_SLACK`] of.
pub(crate) fn snap(v: f64) -> f64 {
    if (v - v.round()).abs() < EDGE_SLACK {
        v.round()
    } else {
        v
    }
}
