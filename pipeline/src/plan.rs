//! Crop planning: where each sample's crop lies in the source image, decided from the
//! image's size alone (known from the shard index), before anything is decoded. The
//! same plan drives the CPU and the GPU path, so their outputs can be compared.
//!
//! Semantics follow torchvision: `RandomResizedCrop` (10 attempts, then a centre crop
//! clamped to the ratio range) and, for evaluation, `Resize(shorter side)` +
//! `CenterCrop`.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A crop of the source image, in source pixels, plus a horizontal flip.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CropWindow {
    /// Left edge (column).
    pub x: f64,
    /// Top edge (row).
    pub y: f64,
    pub width: f64,
    pub height: f64,
    pub flip: bool,
}

/// torchvision's RandomResizedCrop parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RandomResizedCrop {
    /// Range of the crop's area as a fraction of the image (0.08..1.0).
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio w/h (3/4..4/3), sampled log-uniformly.
    pub ratio: (f64, f64),
    /// Probability of a horizontal flip.
    pub flip_p: f64,
}

impl Default for RandomResizedCrop {
    fn default() -> Self {
        Self {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
        }
    }
}

impl RandomResizedCrop {
    /// The crop for an image of `width` x `height`, from the sample's own seed
    /// (see [`crate::sampler::sample_seed`]).
    pub fn plan(&self, width: u32, height: u32, seed: u64) -> CropWindow {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (x, y, w, h) = self.window(width, height, &mut rng);
        let flip = rng.gen::<f64>() < self.flip_p;
        CropWindow {
            x: x as f64,
            y: y as f64,
            width: w as f64,
            height: h as f64,
            flip,
        }
    }

    /// Integer window as torchvision's `get_params` computes it (Python rounds half to
    /// even, hence `round_ties_even`).
    fn window(&self, width: u32, height: u32, rng: &mut impl Rng) -> (u32, u32, u32, u32) {
        let (wf, hf) = (f64::from(width), f64::from(height));
        let area = wf * hf;
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, log_lo, log_hi).exp();
            let w = (target_area * aspect).sqrt().round_ties_even();
            let h = (target_area / aspect).sqrt().round_ties_even();
            if w > 0.0 && w <= wf && h > 0.0 && h <= hf {
                let (w, h) = (w as u32, h as u32);
                let y = rng.gen_range(0..=height - h);
                let x = rng.gen_range(0..=width - w);
                return (x, y, w, h);
            }
        }
        // Fallback: a centre crop of the whole image, clamped to the ratio range.
        let in_ratio = wf / hf;
        let (w, h) = if in_ratio < self.ratio.0 {
            (width, ((wf / self.ratio.0).round_ties_even() as u32).max(1))
        } else if in_ratio > self.ratio.1 {
            (
                ((hf * self.ratio.1).round_ties_even() as u32).max(1),
                height,
            )
        } else {
            (width, height)
        };
        (
            (width - w.min(width)) / 2,
            (height - h.min(height)) / 2,
            w.min(width),
            h.min(height),
        )
    }
}

fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

/// Evaluation transform: resize so the shorter side is `resize`, then take the centre
/// `crop` x `crop`. Expressed as a window of the source image so it is one resampling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CenterCrop {
    pub resize: u32,
    pub crop: u32,
}

impl Default for CenterCrop {
    fn default() -> Self {
        Self {
            resize: 256,
            crop: 224,
        }
    }
}

impl CenterCrop {
    /// The evaluation transform for a `crop`-pixel output: the shorter side resized to
    /// `crop * 8 / 7` (256 for 224, torchvision's ImageNet ratio), rounded up.
    pub fn for_crop(crop: u32) -> Self {
        Self {
            resize: (crop * 8).div_ceil(7),
            crop,
        }
    }

    /// The source window that `Resize(resize)` + `CenterCrop(crop)` keeps.
    pub fn plan(&self, width: u32, height: u32) -> CropWindow {
        let (wf, hf) = (f64::from(width), f64::from(height));
        // torchvision: the shorter side becomes `resize`, the longer is truncated.
        let (rw, rh) = if width <= height {
            (
                f64::from(self.resize),
                (f64::from(self.resize) * hf / wf).floor(),
            )
        } else {
            (
                (f64::from(self.resize) * wf / hf).floor(),
                f64::from(self.resize),
            )
        };
        let (sx, sy) = (wf / rw, hf / rh);
        let c = f64::from(self.crop);
        // CenterCrop offsets are rounded in the resized image, as torchvision does.
        let top = ((rh - c) / 2.0).round_ties_even();
        let left = ((rw - c) / 2.0).round_ties_even();
        CropWindow {
            x: left * sx,
            y: top * sy,
            width: c * sx,
            height: c * sy,
            flip: false,
        }
    }
}

/// The largest JPEG DCT-domain downscale (1, 2, 4 or 8) that still leaves the crop at
/// least `out` pixels on each side, so decoding does less work without losing detail.
pub fn dct_scale_denominator(crop: &CropWindow, out_width: u32, out_height: u32) -> u32 {
    [8u32, 4, 2]
        .into_iter()
        .find(|&d| {
            crop.width / f64::from(d) >= f64::from(out_width)
                && crop.height / f64::from(d) >= f64::from(out_height)
        })
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_crops_stay_inside_and_respect_ranges() {
        let rrc = RandomResizedCrop::default();
        let mut flips = 0;
        for seed in 0..2000 {
            let (w, h) = (500, 375);
            let c = rrc.plan(w, h, seed);
            assert!(c.x >= 0.0 && c.y >= 0.0);
            assert!(c.x + c.width <= f64::from(w) && c.y + c.height <= f64::from(h));
            let frac = c.width * c.height / f64::from(w * h);
            assert!(frac > 0.07 && frac <= 1.0, "{frac}");
            flips += c.flip as u32;
        }
        assert!((850..1150).contains(&flips), "{flips}");
        assert_eq!(rrc.plan(500, 375, 42), rrc.plan(500, 375, 42));
    }

    #[test]
    fn fallback_is_a_ratio_clamped_centre_crop() {
        // A scale range no window can satisfy forces the fallback.
        let rrc = RandomResizedCrop {
            scale: (2.0, 3.0),
            ..Default::default()
        };
        let c = rrc.plan(1000, 100, 1);
        assert_eq!((c.width, c.height), (133.0, 100.0));
        assert_eq!((c.x, c.y), (433.0, 0.0));
        let c = rrc.plan(300, 300, 1);
        assert_eq!((c.x, c.y, c.width, c.height), (0.0, 0.0, 300.0, 300.0));
    }

    #[test]
    fn center_crop_matches_resize_then_crop() {
        assert_eq!(CenterCrop::for_crop(224), CenterCrop::default());
        let c = CenterCrop::default().plan(500, 375);
        // Resized to 341x256; crop 224 starts at (58.5 -> 58, 16).
        let s = 375.0 / 256.0;
        assert!((c.height - 224.0 * s).abs() < 1e-9);
        assert!((c.y - 16.0 * s).abs() < 1e-9);
        assert!((c.x - 58.0 * (500.0 / 341.0)).abs() < 1e-9);
    }

    #[test]
    fn dct_scale_never_goes_below_the_output() {
        let crop = |w, h| CropWindow {
            x: 0.0,
            y: 0.0,
            width: w,
            height: h,
            flip: false,
        };
        assert_eq!(dct_scale_denominator(&crop(2000.0, 1800.0), 224, 224), 8);
        assert_eq!(dct_scale_denominator(&crop(500.0, 460.0), 224, 224), 2);
        assert_eq!(dct_scale_denominator(&crop(300.0, 300.0), 224, 224), 1);
    }
}
