//! The CPU augmentation step: crop + antialiased bilinear resize + horizontal flip +
//! normalise + cast + layout, in one horizontal and one vertical pass, written straight
//! into one sample's slot of a batch buffer.
//!
//! The resampling is Pillow's `BILINEAR` resize (what torchvision's `RandomResizedCrop`,
//! `Resize` and `F.resized_crop` run on PIL images), reproduced bit for bit from
//! `libImaging/Resample.c`: the triangle filter widened by the downscale factor, the
//! centre convention `center = box0 + (i + 0.5) * scale`, normalised coefficients in
//! 22-bit fixed point, each pass rounded to `u8`, and Pillow 13's choice of which pass
//! runs first (vertical first when it removes more than twice as many rows as the
//! horizontal pass removes columns; earlier Pillows always go horizontal first, which
//! changes at most one level in a few pixels). The flip reverses the horizontal filter
//! table, so it costs nothing and equals flipping afterwards.
//!
//! At the window's edges the filter either stops ([`WindowEdges::Crop`], the default:
//! crop, then resize, as torchvision's training transforms do) or reads on into the
//! image ([`WindowEdges::Image`]: resize, then crop, as `Resize` + `CenterCrop` do, for
//! [`CenterCrop`](crate::plan::CenterCrop) windows). With the matching choice the `u8`
//! output equals torchvision's exactly for both, and the normalised float output equals
//! `ToTensor` + `Normalize` on it up to float rounding (one multiply-add per value);
//! `tests/augment_vs_torchvision.rs` checks this against the real thing.
//!
//! The horizontal pass has an AVX2 kernel, picked at run time; elsewhere portable
//! kernels written for the compiler to vectorise compute the same sums.
//!
//! ```
//! use convnets_pipeline::cpu::augment::{
//!     Augmenter, Layout, Normalize, OutputDtype, OutputSpec, WindowEdges,
//! };
//! use convnets_pipeline::plan::{CenterCrop, CropWindow};
//!
//! let (w, h) = (64u32, 48u32);
//! let image = vec![128u8; (w * h * 3) as usize];
//! let spec = OutputSpec {
//!     width: 32,
//!     height: 32,
//!     dtype: OutputDtype::F32,
//!     layout: Layout::Nchw,
//!     normalize: Some(Normalize::default()),
//! };
//! let mut out = vec![0u8; spec.sample_bytes()];
//! let crop = CropWindow { x: 8.0, y: 0.0, width: 48.0, height: 48.0, flip: true };
//! Augmenter::new().crop_resize_into(&image, w, h, &crop, &spec, &mut out)?;
//! let first = f32::from_ne_bytes(out[..4].try_into().unwrap());
//! assert!((first - (128.0 / 255.0 - 0.485) / 0.229).abs() < 1e-5);
//!
//! // Evaluation (Resize + CenterCrop): the filter reads past the window's edges.
//! let mut eval = Augmenter::with_edges(WindowEdges::Image);
//! eval.crop_resize_into(&image, w, h, &CenterCrop::default().plan(w, h), &spec, &mut out)?;
//! # Ok::<(), convnets_pipeline::cpu::augment::AugmentError>(())
//! ```

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::output::{snap, Span};
pub use crate::output::{Layout, Normalize, OutputDtype, OutputSpec, WindowEdges};
use crate::plan::CropWindow;

/// Why a sample could not be produced. Every argument is checked before any work.
#[derive(Debug, thiserror::Error)]
pub enum AugmentError {
    #[error(
        "source image is {width}x{height} RGB ({expected} bytes) but the slice has {got} bytes"
    )]
    SourceSize {
        width: u32,
        height: u32,
        expected: usize,
        got: usize,
    },
    #[error("output slot must be {expected} bytes for this OutputSpec, got {got}")]
    OutputSize { expected: usize, got: usize },
    #[error("output size {width}x{height} is empty")]
    EmptyOutput { width: u32, height: u32 },
    #[error("crop window {crop:?} is empty, not finite or outside the {width}x{height} image")]
    BadCrop {
        crop: CropWindow,
        width: u32,
        height: u32,
    },
    #[error("U8 output cannot hold normalised values; use F16/F32 or `normalize: None`")]
    NormalizedU8,
    #[error(
        "normalisation {0:?} has a non-finite mean, or a std that is zero, subnormal or not finite"
    )]
    BadNormalize(Normalize),
}

/// Refuses an output spec no sample can be produced for, before any work.
fn check_spec(spec: &OutputSpec) -> Result<(), AugmentError> {
    if spec.width == 0 || spec.height == 0 {
        return Err(AugmentError::EmptyOutput {
            width: spec.width,
            height: spec.height,
        });
    }
    if let Some(n) = &spec.normalize {
        if spec.dtype == OutputDtype::U8 {
            return Err(AugmentError::NormalizedU8);
        }
        let ok = n.mean.iter().all(|m| m.is_finite()) && n.std.iter().all(|s| s.is_normal());
        if !ok {
            return Err(AugmentError::BadNormalize(*n));
        }
    }
    Ok(())
}

/// Pillow's `PRECISION_BITS` for 8-bit images: coefficients are fixed point with 22
/// fractional bits, leaving room for 8 bits of pixel and 2 of overshoot in an `i32`.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Rounding term added before the final shift.
const HALF: i32 = 1 << (PRECISION_BITS - 1);
/// Fixed-point filter coefficients for one axis: output pixel `i` reads `width` source
/// pixels from `starts[i]`, weighted by `coeffs[i * width..][..width]`. Every output has
/// the same number of taps (zero-padded, inside the span), so the kernels can be
/// specialised on it. Grow-only buffers, rebuilt per call without allocating.
#[derive(Debug, Default)]
struct FilterTable {
    starts: Vec<u32>,
    coeffs: Vec<i32>,
    width: usize,
    /// `coeffs` again with each output's taps zero-padded to a multiple of 4 (the AVX2
    /// horizontal kernel takes them 4 at a time).
    coeffs4: Vec<i32>,
    /// Pillow's coefficients before padding: `ksize` per output, and `(start, len)`.
    raw: Vec<i32>,
    raw_taps: Vec<(usize, usize)>,
    weights: Vec<f64>,
}

impl FilterTable {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for `BILINEAR`, resizing
    /// `span` to `out_size` pixels. Zero coefficients at either end are dropped and the
    /// rest padded back with zeros to a common width, which changes no sum. `reverse`
    /// lists the outputs right to left (a horizontal flip).
    fn build(&mut self, span: Span, out_size: usize, reverse: bool) {
        let in_size = span.hi - span.lo;
        let scale = span.len() / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // the triangle's support is 1, widened when downscaling
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        self.raw.clear();
        self.raw.resize(out_size * ksize, 0);
        self.raw_taps.clear();
        self.raw_taps.resize(out_size, (0, 0));
        self.weights.clear();
        self.weights.resize(ksize, 0.0);

        for xx in 0..out_size {
            let center = span.in0 + (xx as f64 + 0.5) * scale;
            // `as` truncates toward zero, like Pillow's `(int)` casts.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = usize::try_from(xmax - xmin).unwrap_or(0).min(ksize);
            let xmin = xmin as usize;
            let mut ww = 0.0;
            for (x, w) in self.weights[..n].iter_mut().enumerate() {
                let t = (((x + xmin) as f64 - center + 0.5) * ss).abs();
                *w = if t < 1.0 { 1.0 - t } else { 0.0 };
                ww += *w;
            }
            let slot = if reverse { out_size - 1 - xx } else { xx };
            let k = &mut self.raw[slot * ksize..][..ksize];
            let (mut first, mut last) = (usize::MAX, 0);
            for (x, &w) in self.weights[..n].iter().enumerate() {
                let w = if ww != 0.0 { w / ww } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                let fixed = if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
                if fixed != 0 {
                    first = first.min(x);
                    last = x;
                }
                k[x] = fixed;
            }
            self.raw_taps[slot] = if first == usize::MAX {
                // Cannot happen for a non-empty span (some tap lies within half a pixel of
                // the centre); one zero tap keeps the output defined all the same.
                (xmin.min(in_size - 1), 1)
            } else {
                k.copy_within(first..=last, 0);
                (xmin + first, last - first + 1)
            };
        }

        // Pad to the widest filter; the padded taps stay inside the span.
        let width = self.raw_taps.iter().map(|&(_, len)| len).max().unwrap_or(1);
        self.width = width;
        self.starts.clear();
        self.coeffs.clear();
        self.coeffs.resize(out_size * width, 0);
        for (i, &(start, len)) in self.raw_taps.iter().enumerate() {
            let padded = start.min(in_size - width);
            let front = start - padded;
            self.coeffs[i * width + front..][..len].copy_from_slice(&self.raw[i * ksize..][..len]);
            self.starts.push((span.lo + padded) as u32);
        }
        let width4 = width.next_multiple_of(4);
        self.coeffs4.clear();
        self.coeffs4.resize(out_size * width4, 0);
        for (dst, src) in self
            .coeffs4
            .chunks_exact_mut(width4)
            .zip(self.coeffs.chunks_exact(width))
        {
            dst[..width].copy_from_slice(src);
        }
    }

    /// The source indices any output reads: `first..end`.
    fn extent(&self) -> (usize, usize) {
        let first = self.starts.iter().copied().min().unwrap_or(0) as usize;
        let last = self.starts.iter().copied().max().unwrap_or(0) as usize;
        (first, last + self.width)
    }
}

#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Reusable scratch for [`Augmenter::crop_resize_into`]: filter tables, the output of the
/// first pass, and the buffers of the output stage. Owned by one worker thread; its
/// buffers only grow, so steady state allocates nothing.
#[derive(Debug, Default)]
pub struct Augmenter {
    edges: WindowEdges,
    horizontal: FilterTable,
    vertical: FilterTable,
    /// Output of the first pass, `u8` RGB interleaved: the rows the vertical filter reads
    /// (horizontal pass first) or one row (vertical pass first).
    intermediate: Vec<u8>,
    /// A row near the end of the image, copied with [`SPARE`] bytes after it.
    last_row: Vec<u8>,
    output: RowOutput,
    /// Skip the AVX2 kernels even where the CPU has them (to test the portable ones).
    portable_only: bool,
}

impl Augmenter {
    /// An augmenter for training windows ([`WindowEdges::Crop`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// An augmenter whose filter treats window edges as `edges` says: use
    /// [`WindowEdges::Image`] for [`CenterCrop`](crate::plan::CenterCrop) windows.
    pub fn with_edges(edges: WindowEdges) -> Self {
        Self {
            edges,
            ..Self::default()
        }
    }

    /// `src`: RGB u8 HWC, `src_w x src_h`. Writes one sample into `out` (exactly
    /// `spec.sample_bytes()` bytes, dtype's native-endian representation).
    ///
    /// The window `crop` (source pixels, may be fractional) is resized to
    /// `spec.width x spec.height`, mirrored left-right if `crop.flip`, then normalised,
    /// cast and laid out as `spec` says. See the module docs for the exact semantics.
    pub fn crop_resize_into(
        &mut self,
        src: &[u8],
        src_w: u32,
        src_h: u32,
        crop: &CropWindow,
        spec: &OutputSpec,
        out: &mut [u8],
    ) -> Result<(), AugmentError> {
        check_spec(spec)?;
        let expected = (src_w as usize)
            .checked_mul(src_h as usize)
            .and_then(|n| n.checked_mul(3));
        if expected != Some(src.len()) {
            return Err(AugmentError::SourceSize {
                width: src_w,
                height: src_h,
                expected: expected.unwrap_or(usize::MAX),
                got: src.len(),
            });
        }
        if out.len() != spec.sample_bytes() {
            return Err(AugmentError::OutputSize {
                expected: spec.sample_bytes(),
                got: out.len(),
            });
        }
        let bad_crop = || AugmentError::BadCrop {
            crop: *crop,
            width: src_w,
            height: src_h,
        };
        let x = Span::new(crop.x, crop.width, src_w, self.edges).ok_or_else(bad_crop)?;
        let y = Span::new(crop.y, crop.height, src_h, self.edges).ok_or_else(bad_crop)?;

        let (out_w, out_h) = (spec.width as usize, spec.height as usize);
        self.horizontal.build(x, out_w, crop.flip);
        self.vertical.build(y, out_h, false);
        self.output.prepare(spec);
        // Pillow (>= 13) runs the vertical pass first when it removes more than twice as
        // many rows as the horizontal pass removes columns. The order decides how the
        // intermediate image is rounded, so we follow it, judged on the image Pillow
        // would resize: the span the filter reads, scaled as the window is (for a
        // crop-then-resize window that is the window itself).
        let (x_in, y_in) = ((x.hi - x.lo) as f64, (y.hi - y.lo) as f64);
        let x_out = snap(x_in * out_w as f64 / x.len());
        let y_out = snap(y_in * out_h as f64 / y.len());
        let vertical_first = y_out < y_in && y_in - y_out > 2.0 * (x_in - x_out);
        dispatch(self, src, src_w as usize, spec, vertical_first, out);
        Ok(())
    }
}

/// The output stage: one resampled `u8` row in, one row of the sample out.
#[derive(Debug, Default)]
struct RowOutput {
    row_u8: Vec<u8>,
    row_f32: Vec<f32>,
    row_f16: Vec<f16>,
    row_bf16: Vec<bf16>,
    /// Per-element scale and offset of an interleaved row (`v * scale + offset`).
    scale: Vec<f32>,
    offset: Vec<f32>,
}

impl RowOutput {
    /// Sizes the row buffers and precomputes the scale/offset for `spec`.
    fn prepare(&mut self, spec: &OutputSpec) {
        let n = spec.width as usize * 3;
        self.row_u8.resize(n, 0);
        if spec.dtype == OutputDtype::U8 {
            return;
        }
        self.row_f32.resize(n, 0.0);
        if spec.dtype == OutputDtype::F16 {
            self.row_f16.resize(n, f16::ZERO);
        }
        if spec.dtype == OutputDtype::Bf16 {
            self.row_bf16.resize(n, bf16::ZERO);
        }
        let (s, o) = spec.scale_offset();
        self.scale.clear();
        self.offset.clear();
        for _ in 0..spec.width {
            self.scale.extend_from_slice(&s);
            self.offset.extend_from_slice(&o);
        }
    }

    /// Normalises, casts and writes `row_u8` as output row `yy`.
    #[inline(always)]
    fn emit(&mut self, yy: usize, spec: &OutputSpec, out: &mut [u8]) {
        let out_w = spec.width as usize;
        let row_len = out_w * 3;
        let plane_bytes = out_w * spec.height as usize * spec.dtype.size();
        if spec.dtype == OutputDtype::U8 {
            match spec.layout {
                Layout::Nhwc => out[yy * row_len..][..row_len].copy_from_slice(&self.row_u8),
                Layout::Nchw => {
                    let [r, g, b] = plane_rows(out, plane_bytes, yy * out_w, out_w);
                    for (((px, r), g), b) in self.row_u8.chunks_exact(3).zip(r).zip(g).zip(b) {
                        (*r, *g, *b) = (px[0], px[1], px[2]);
                    }
                }
            }
            return;
        }

        // Normalise into `row_f32`, already in output order (RGB interleaved, or R then
        // G then B for a planar layout).
        let values = &mut self.row_f32[..row_len];
        match spec.layout {
            Layout::Nhwc => {
                for (((f, &v), &s), &o) in values
                    .iter_mut()
                    .zip(&self.row_u8)
                    .zip(&self.scale)
                    .zip(&self.offset)
                {
                    *f = f32::from(v) * s + o;
                }
            }
            Layout::Nchw => {
                let (s, o) = (&self.scale[..3], &self.offset[..3]);
                let (r, gb) = values.split_at_mut(out_w);
                let (g, b) = gb.split_at_mut(out_w);
                for (((px, r), g), b) in self.row_u8.chunks_exact(3).zip(r).zip(g).zip(b) {
                    *r = f32::from(px[0]) * s[0] + o[0];
                    *g = f32::from(px[1]) * s[1] + o[1];
                    *b = f32::from(px[2]) * s[2] + o[2];
                }
            }
        }
        let bytes: &[u8] = match spec.dtype {
            OutputDtype::F16 => {
                let halves = &mut self.row_f16[..row_len];
                halves.convert_from_f32_slice(values);
                half_bytes(halves)
            }
            OutputDtype::Bf16 => {
                let halves = &mut self.row_bf16[..row_len];
                halves.convert_from_f32_slice(values);
                half_bytes(halves)
            }
            _ => f32_bytes(values),
        };
        match spec.layout {
            Layout::Nhwc => out[yy * bytes.len()..][..bytes.len()].copy_from_slice(bytes),
            Layout::Nchw => {
                let es = spec.dtype.size();
                let rows = plane_rows(out, plane_bytes, yy * out_w * es, out_w * es);
                for (dst, src) in rows.into_iter().zip(bytes.chunks_exact(out_w * es)) {
                    dst.copy_from_slice(src);
                }
            }
        }
    }
}

/// The `len` bytes at `offset` in each of the three channel planes of `out`.
#[inline(always)]
fn plane_rows(out: &mut [u8], plane_bytes: usize, offset: usize, len: usize) -> [&mut [u8]; 3] {
    let (r, gb) = out.split_at_mut(plane_bytes);
    let (g, b) = gb.split_at_mut(plane_bytes);
    [r, g, b].map(|plane| &mut plane[offset..][..len])
}

/// The native-endian bytes of `values`.
fn f32_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: `u8` has no alignment or validity requirement, and the byte length is that
    // of the `f32` slice, borrowed for the same lifetime.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// The native-endian bytes of `values` (`f16` or `bf16`).
fn half_bytes<T: Copy>(values: &[T]) -> &[u8] {
    // SAFETY: as for `f32_bytes`; both half types are plain 16-bit values.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// Runs the passes with the widest vector unit this CPU has; the kernels are written so
/// the compiler vectorises them, and AVX2 doubles the lanes and adds a 32-bit multiply.
fn dispatch(
    a: &mut Augmenter,
    src: &[u8],
    src_w: usize,
    spec: &OutputSpec,
    vertical_first: bool,
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if !a.portable_only && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { resample_avx2(a, src, src_w, spec, vertical_first, out) };
        return;
    }
    resample::<false>(a, src, src_w, spec, vertical_first, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn resample_avx2(
    a: &mut Augmenter,
    src: &[u8],
    src_w: usize,
    spec: &OutputSpec,
    vertical_first: bool,
    out: &mut [u8],
) {
    resample::<true>(a, src, src_w, spec, vertical_first, out);
}

/// Bytes after the last pixel a horizontal kernel reads that it may load (and ignore).
const SPARE: usize = 16;

/// Both passes and the output stage, in Pillow's order. `AVX2`: the CPU has it (only
/// [`resample_avx2`] passes `true`).
#[inline(always)]
fn resample<const AVX2: bool>(
    a: &mut Augmenter,
    src: &[u8],
    src_w: usize,
    spec: &OutputSpec,
    vertical_first: bool,
    out: &mut [u8],
) {
    let (out_w, out_h) = (spec.width as usize, spec.height as usize);
    let (stride, row_len) = (src_w * 3, out_w * 3);
    let (v, h) = (&a.vertical, &a.horizontal);
    if vertical_first {
        // Vertical pass over the columns the horizontal filter reads, one row at a time,
        // then straight through the horizontal pass into the output stage.
        let (c0, c1) = h.extent();
        let cols = c0 * 3..c1 * 3;
        a.intermediate.resize(cols.len() + SPARE, 0);
        for yy in 0..out_h {
            let first = v.starts[yy] as usize;
            let coeffs = &v.coeffs[yy * v.width..][..v.width];
            filter_vertical(
                src,
                stride,
                cols.clone(),
                first,
                coeffs,
                &mut a.intermediate,
            );
            filter_horizontal::<AVX2>(&a.intermediate, c0, h, &mut a.output.row_u8);
            a.output.emit(yy, spec, out);
        }
    } else {
        // Horizontal pass over every row the vertical filter reads, then the vertical
        // pass one output row at a time into the output stage.
        let (r0, r1) = v.extent();
        let (_, c1) = h.extent();
        a.intermediate.resize((r1 - r0) * row_len, 0);
        for (r, dst) in a.intermediate.chunks_exact_mut(row_len).enumerate() {
            let row = &src[(r0 + r) * stride..];
            if row.len() >= c1 * 3 + SPARE {
                filter_horizontal::<AVX2>(row, 0, h, dst);
            } else {
                // The image's last row(s), read too close to the end of `src`.
                a.last_row.clear();
                a.last_row.extend_from_slice(&row[..c1 * 3]);
                a.last_row.resize(c1 * 3 + SPARE, 0);
                filter_horizontal::<AVX2>(&a.last_row, 0, h, dst);
            }
        }
        for yy in 0..out_h {
            let first = v.starts[yy] as usize - r0;
            let coeffs = &v.coeffs[yy * v.width..][..v.width];
            filter_vertical(
                &a.intermediate,
                row_len,
                0..row_len,
                first,
                coeffs,
                &mut a.output.row_u8,
            );
            a.output.emit(yy, spec, out);
        }
    }
}

/// Pillow's `ImagingResampleHorizontal_8bpc` for one row: `src` holds RGB pixels from
/// column `col0` on, and [`SPARE`] bytes after the last pixel read; `dst` gets one RGB
/// pixel per output of `table`.
#[inline(always)]
fn filter_horizontal<const AVX2: bool>(
    src: &[u8],
    col0: usize,
    table: &FilterTable,
    dst: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: `AVX2` is true only in `resample_avx2`, called once AVX2 was detected.
        unsafe { avx2::horizontal(src, col0, table, dst) };
        return;
    }
    match table.width {
        1 => horizontal_fixed::<1>(src, col0, table, dst),
        2 => horizontal_fixed::<2>(src, col0, table, dst),
        3 => horizontal_fixed::<3>(src, col0, table, dst),
        4 => horizontal_fixed::<4>(src, col0, table, dst),
        5 => horizontal_fixed::<5>(src, col0, table, dst),
        6 => horizontal_fixed::<6>(src, col0, table, dst),
        7 => horizontal_fixed::<7>(src, col0, table, dst),
        8 => horizontal_fixed::<8>(src, col0, table, dst),
        _ => horizontal_any(src, col0, table, dst),
    }
}

/// `K` taps per output. Each pixel is loaded as 4 bytes (RGB + the next pixel's R) so
/// the three channels plus one ignored lane form one 4-lane vector operation.
#[inline(always)]
fn horizontal_fixed<const K: usize>(src: &[u8], col0: usize, table: &FilterTable, dst: &mut [u8]) {
    for ((px, &start), k) in dst
        .chunks_exact_mut(3)
        .zip(&table.starts)
        .zip(table.coeffs.chunks_exact(K))
    {
        let off = (start as usize - col0) * 3;
        let s = &src[off..off + 3 * K + 1];
        let mut acc = [HALF; 4];
        for t in 0..K {
            for (c, a) in acc.iter_mut().enumerate() {
                *a += i32::from(s[3 * t + c]) * k[t];
            }
        }
        px[0] = clip8(acc[0]);
        px[1] = clip8(acc[1]);
        px[2] = clip8(acc[2]);
    }
}

/// Any number of taps (strong downscales).
#[inline(always)]
fn horizontal_any(src: &[u8], col0: usize, table: &FilterTable, dst: &mut [u8]) {
    let k_all = table.coeffs.chunks_exact(table.width);
    for ((px, &start), k) in dst.chunks_exact_mut(3).zip(&table.starts).zip(k_all) {
        let s = &src[(start as usize - col0) * 3..][..table.width * 3];
        let (mut r, mut g, mut b) = (HALF, HALF, HALF);
        for (p, &k) in s.chunks_exact(3).zip(k) {
            r += i32::from(p[0]) * k;
            g += i32::from(p[1]) * k;
            b += i32::from(p[2]) * k;
        }
        px[0] = clip8(r);
        px[1] = clip8(g);
        px[2] = clip8(b);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{FilterTable, HALF, PRECISION_BITS};

    /// [`super::horizontal_fixed`] with explicit vectors: a 16-byte load holds 4 RGB
    /// pixels, two byte shuffles spread them to 4 `i32` lanes each (RGB + the next
    /// pixel's R, ignored), and each 256-bit multiply-add applies two taps. Exact 32-bit
    /// arithmetic, the same sums as Pillow's.
    #[target_feature(enable = "avx2")]
    pub(super) fn horizontal(src: &[u8], col0: usize, table: &FilterTable, dst: &mut [u8]) {
        const NONE: i8 = -1;
        let taps01 = _mm_setr_epi8(
            0, 1, 2, 3, 3, 4, 5, 6, NONE, NONE, NONE, NONE, NONE, NONE, NONE, NONE,
        );
        let taps23 = _mm_setr_epi8(
            6, 7, 8, 9, 9, 10, 11, 12, NONE, NONE, NONE, NONE, NONE, NONE, NONE, NONE,
        );
        let lanes01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        let lanes23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
        let half = _mm_set1_epi32(HALF);
        let width4 = table.width.next_multiple_of(4);
        for ((px, &start), k) in dst
            .chunks_exact_mut(3)
            .zip(&table.starts)
            .zip(table.coeffs4.chunks_exact(width4))
        {
            let s = &src[(start as usize - col0) * 3..][..width4 * 3 + 4];
            let mut acc = _mm256_setzero_si256();
            for (pixels, k) in s.chunks(12).zip(k.chunks_exact(4)) {
                // SAFETY: `s` ends 4 bytes past the last 12-byte group, and its slice
                // bounds are checked; unaligned loads are allowed.
                let v = unsafe { _mm_loadu_si128(pixels.as_ptr().cast()) };
                let k = unsafe { _mm_loadu_si128(k.as_ptr().cast()) };
                let k = _mm256_castsi128_si256(k);
                let p01 = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(v, taps01));
                let p23 = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(v, taps23));
                acc = _mm256_add_epi32(
                    acc,
                    _mm256_mullo_epi32(p01, _mm256_permutevar8x32_epi32(k, lanes01)),
                );
                acc = _mm256_add_epi32(
                    acc,
                    _mm256_mullo_epi32(p23, _mm256_permutevar8x32_epi32(k, lanes23)),
                );
            }
            let sum = _mm_add_epi32(
                _mm256_castsi256_si128(acc),
                _mm256_extracti128_si256::<1>(acc),
            );
            let sum = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(_mm_add_epi32(sum, half));
            // Saturating packs clamp to 0..=255 exactly as `clip8` does.
            let bytes = _mm_packus_epi16(_mm_packs_epi32(sum, sum), sum);
            px.copy_from_slice(&_mm_cvtsi128_si32(bytes).to_le_bytes()[..3]);
        }
    }
}

/// Pillow's `ImagingResampleVertical_8bpc` for one output row: the bytes `cols` of rows
/// `first..first + coeffs.len()` of `src` (rows `stride` bytes apart), weighted and
/// summed into `dst`.
#[inline(always)]
fn filter_vertical(
    src: &[u8],
    stride: usize,
    cols: std::ops::Range<usize>,
    first: usize,
    coeffs: &[i32],
    dst: &mut [u8],
) {
    let rows = &src[first * stride + cols.start..];
    let dst = &mut dst[..cols.len()];
    match coeffs.len() {
        1 => vertical_fixed::<1>(rows, stride, coeffs, dst),
        2 => vertical_fixed::<2>(rows, stride, coeffs, dst),
        3 => vertical_fixed::<3>(rows, stride, coeffs, dst),
        4 => vertical_fixed::<4>(rows, stride, coeffs, dst),
        5 => vertical_fixed::<5>(rows, stride, coeffs, dst),
        6 => vertical_fixed::<6>(rows, stride, coeffs, dst),
        7 => vertical_fixed::<7>(rows, stride, coeffs, dst),
        8 => vertical_fixed::<8>(rows, stride, coeffs, dst),
        _ => vertical_any(rows, stride, coeffs, dst),
    }
}

/// `K` rows, summed in registers: one pass over `dst`, vectorised along the row.
#[inline(always)]
fn vertical_fixed<const K: usize>(rows: &[u8], stride: usize, coeffs: &[i32], dst: &mut [u8]) {
    let n = dst.len();
    let row: [&[u8]; K] = std::array::from_fn(|t| &rows[t * stride..][..n]);
    let k: [i32; K] = std::array::from_fn(|t| coeffs[t]);
    for (i, d) in dst.iter_mut().enumerate() {
        let mut acc = HALF;
        for t in 0..K {
            acc += i32::from(row[t][i]) * k[t];
        }
        *d = clip8(acc);
    }
}

/// Any number of rows (strong downscales): accumulated row after row in `i32`, a stack
/// buffer's worth of the row at a time.
#[inline(always)]
fn vertical_any(rows: &[u8], stride: usize, coeffs: &[i32], dst: &mut [u8]) {
    let n = dst.len();
    let mut acc = [0i32; 256];
    for start in (0..n).step_by(acc.len()) {
        let len = acc.len().min(n - start);
        let acc = &mut acc[..len];
        acc.fill(HALF);
        for (t, &k) in coeffs.iter().enumerate() {
            for (a, &v) in acc.iter_mut().zip(&rows[t * stride + start..][..len]) {
                *a += i32::from(v) * k;
            }
        }
        for (d, &a) in dst[start..start + len].iter_mut().zip(acc.iter()) {
            *d = clip8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(width: u32, height: u32, dtype: OutputDtype, layout: Layout) -> OutputSpec {
        let normalize = (dtype != OutputDtype::U8).then(Normalize::default);
        OutputSpec {
            width,
            height,
            dtype,
            layout,
            normalize,
        }
    }

    fn window(x: f64, y: f64, width: f64, height: f64, flip: bool) -> CropWindow {
        CropWindow {
            x,
            y,
            width,
            height,
            flip,
        }
    }

    /// A deterministic image with edges, gradients and noise.
    fn test_image(w: u32, h: u32) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut out = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3u32 {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let noise = (state >> 59) as u32;
                    let base = if (x / 7 + y / 5 + c) % 2 == 0 {
                        40
                    } else {
                        200
                    };
                    out.push(((base + x * (c + 1) / 3 + noise) % 256) as u8);
                }
            }
        }
        out
    }

    fn run(img: &[u8], w: u32, h: u32, crop: &CropWindow, spec: &OutputSpec) -> Vec<u8> {
        let mut out = vec![0u8; spec.sample_bytes()];
        Augmenter::new()
            .crop_resize_into(img, w, h, crop, spec, &mut out)
            .unwrap();
        out
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn f16s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(2)
            .map(|b| f16::from_ne_bytes(b.try_into().unwrap()).to_f32())
            .collect()
    }

    fn bf16s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(2)
            .map(|b| bf16::from_ne_bytes(b.try_into().unwrap()).to_f32())
            .collect()
    }

    #[test]
    fn identity_crop_reproduces_the_input() {
        let (w, h) = (37, 23);
        let img = test_image(w, h);
        let s = spec(w, h, OutputDtype::U8, Layout::Nhwc);
        assert_eq!(
            run(&img, w, h, &window(0.0, 0.0, 37.0, 23.0, false), &s),
            img
        );
        // An integer sub-window at its own size is a plain crop.
        let s = spec(10, 8, OutputDtype::U8, Layout::Nhwc);
        let out = run(&img, w, h, &window(5.0, 3.0, 10.0, 8.0, false), &s);
        for y in 0..8 {
            for x in 0..10 {
                let (o, i) = ((y * 10 + x) * 3, ((y + 3) * 37 + x + 5) * 3);
                assert_eq!(out[o..o + 3], img[i..i + 3], "pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn flip_mirrors_columns() {
        let (w, h) = (120, 90);
        let img = test_image(w, h);
        for (dtype, layout) in [
            (OutputDtype::U8, Layout::Nhwc),
            (OutputDtype::F32, Layout::Nhwc),
        ] {
            let s = spec(48, 40, dtype, layout);
            let plain = run(&img, w, h, &window(10.0, 5.0, 97.0, 71.0, false), &s);
            let flipped = run(&img, w, h, &window(10.0, 5.0, 97.0, 71.0, true), &s);
            let px = 3 * dtype.size();
            for y in 0..40 {
                for x in 0..48 {
                    let a = &plain[(y * 48 + x) * px..][..px];
                    let b = &flipped[(y * 48 + 47 - x) * px..][..px];
                    assert_eq!(a, b, "{dtype:?} pixel ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn nchw_and_nhwc_hold_the_same_values() {
        let (w, h) = (200, 150);
        let img = test_image(w, h);
        let crop = window(13.0, 7.0, 151.0, 120.0, true);
        for dtype in [OutputDtype::U8, OutputDtype::F16, OutputDtype::F32] {
            let (ow, oh) = (64, 48);
            let planar = run(&img, w, h, &crop, &spec(ow, oh, dtype, Layout::Nchw));
            let packed = run(&img, w, h, &crop, &spec(ow, oh, dtype, Layout::Nhwc));
            let es = dtype.size();
            let plane = (ow * oh) as usize;
            for i in 0..plane {
                for c in 0..3 {
                    let a = &planar[(c * plane + i) * es..][..es];
                    let b = &packed[(i * 3 + c) * es..][..es];
                    assert_eq!(a, b, "{dtype:?} pixel {i} channel {c}");
                }
            }
        }
    }

    #[test]
    fn f16_f32_and_u8_agree() {
        let (w, h) = (160, 120);
        let img = test_image(w, h);
        let crop = window(20.5, 10.25, 111.0, 99.5, false);
        let levels = run(
            &img,
            w,
            h,
            &crop,
            &spec(56, 56, OutputDtype::U8, Layout::Nchw),
        );
        let full = f32s(&run(
            &img,
            w,
            h,
            &crop,
            &spec(56, 56, OutputDtype::F32, Layout::Nchw),
        ));
        let half = f16s(&run(
            &img,
            w,
            h,
            &crop,
            &spec(56, 56, OutputDtype::F16, Layout::Nchw),
        ));
        let brain = bf16s(&run(
            &img,
            w,
            h,
            &crop,
            &spec(56, 56, OutputDtype::Bf16, Layout::Nhwc),
        ));
        let n = Normalize::default();
        let plane = 56 * 56;
        for (i, ((&v, &f), &h)) in levels.iter().zip(&full).zip(&half).enumerate() {
            let c = i / plane;
            let want = (f32::from(v) / 255.0 - n.mean[c]) / n.std[c];
            assert!((f - want).abs() < 1e-5, "f32 {f} vs {want}");
            // f16 keeps 11 significant bits: |x| < 2.7 rounds to within 2^-10.
            assert!((h - f).abs() <= 1.0 / 1024.0, "f16 {h} vs f32 {f}");
            // bf16 keeps 8, rounded to nearest even (the NHWC sample holds the same
            // values as the NCHW one: pixel i % plane, channel c).
            let b = brain[(i % plane) * 3 + c];
            assert_eq!(b, half::bf16::from_f32(f).to_f32(), "bf16 {b} vs f32 {f}");
        }
        // No normalisation: float output is x / 255 (ToTensor).
        let s = OutputSpec {
            normalize: None,
            ..spec(56, 56, OutputDtype::F32, Layout::Nchw)
        };
        let unit = f32s(&run(&img, w, h, &crop, &s));
        for (&v, &f) in levels.iter().zip(&unit) {
            assert!((f - f32::from(v) / 255.0).abs() < 1e-6);
        }
    }

    #[test]
    fn upscaling_interpolates_between_pixels() {
        // A 2-pixel ramp 0 -> 255 stretched to 8: Pillow's bilinear gives a monotone
        // ramp with clamped ends.
        let img = [0u8, 0, 0, 255, 255, 255];
        let s = spec(8, 1, OutputDtype::U8, Layout::Nhwc);
        let out = run(&img, 2, 1, &window(0.0, 0.0, 2.0, 1.0, false), &s);
        let red: Vec<u8> = out.chunks_exact(3).map(|p| p[0]).collect();
        assert_eq!(red, [0, 0, 32, 96, 159, 223, 255, 255]);
        // A small crop of a real image blown up to more than its size.
        let (w, h) = (90, 60);
        let img = test_image(w, h);
        let s = spec(64, 64, OutputDtype::F32, Layout::Nchw);
        let out = f32s(&run(&img, w, h, &window(30.0, 20.0, 16.0, 12.0, true), &s));
        assert!(out.iter().all(|v| v.is_finite() && v.abs() < 3.0));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let (w, h) = (20, 10);
        let img = test_image(w, h);
        let s = spec(8, 8, OutputDtype::F32, Layout::Nchw);
        let full = window(0.0, 0.0, 20.0, 10.0, false);
        let mut a = Augmenter::new();
        let mut out = vec![0u8; s.sample_bytes()];
        let mut short = vec![0u8; s.sample_bytes() - 1];
        assert!(matches!(
            a.crop_resize_into(&img, w, h, &full, &s, &mut short),
            Err(AugmentError::OutputSize { .. })
        ));
        assert!(matches!(
            a.crop_resize_into(&img[1..], w, h, &full, &s, &mut out),
            Err(AugmentError::SourceSize { .. })
        ));
        for crop in [
            window(-1.0, 0.0, 10.0, 10.0, false),
            window(15.0, 0.0, 10.0, 5.0, false),
            window(0.0, 0.0, 0.0, 5.0, false),
            window(0.0, 0.0, 5.0, -1.0, false),
            window(f64::NAN, 0.0, 5.0, 5.0, false),
            window(0.0, 0.0, f64::INFINITY, 5.0, false),
        ] {
            assert!(
                matches!(
                    a.crop_resize_into(&img, w, h, &crop, &s, &mut out),
                    Err(AugmentError::BadCrop { .. })
                ),
                "{crop:?}"
            );
        }
        let empty = OutputSpec { width: 0, ..s };
        assert!(matches!(
            a.crop_resize_into(&img, w, h, &full, &empty, &mut []),
            Err(AugmentError::EmptyOutput { .. })
        ));
        let u8_norm = OutputSpec {
            dtype: OutputDtype::U8,
            ..s
        };
        let mut out8 = vec![0u8; u8_norm.sample_bytes()];
        assert!(matches!(
            a.crop_resize_into(&img, w, h, &full, &u8_norm, &mut out8),
            Err(AugmentError::NormalizedU8)
        ));
        let zero_std = OutputSpec {
            normalize: Some(Normalize {
                mean: [0.0; 3],
                std: [1.0, 0.0, 1.0],
            }),
            ..s
        };
        assert!(matches!(
            a.crop_resize_into(&img, w, h, &full, &zero_std, &mut out),
            Err(AugmentError::BadNormalize(_))
        ));
        // The same Augmenter still works after errors, and on the empty-image edge case.
        a.crop_resize_into(&img, w, h, &full, &s, &mut out).unwrap();
        assert!(matches!(
            a.crop_resize_into(&[], 0, 0, &full, &s, &mut out),
            Err(AugmentError::BadCrop { .. })
        ));
    }

    #[test]
    fn float_noise_at_the_edges_is_tolerated() {
        let (w, h) = (500, 375);
        let img = test_image(w, h);
        let s = spec(224, 224, OutputDtype::U8, Layout::Nhwc);
        let exact = run(&img, w, h, &window(100.0, 0.0, 400.0, 375.0, false), &s);
        let noisy = run(
            &img,
            w,
            h,
            &window(100.0 + 1e-9, -1e-9, 400.0 - 1e-12, 375.0 + 2e-9, false),
            &s,
        );
        assert_eq!(exact, noisy);
    }

    #[test]
    fn window_edges_differ_only_at_the_border() {
        let (w, h) = (160, 120);
        let img = test_image(w, h);
        let s = spec(40, 30, OutputDtype::U8, Layout::Nhwc);
        let mut image_edges = Augmenter::with_edges(WindowEdges::Image);
        let mut run_image = |crop: &CropWindow| {
            let mut out = vec![0u8; s.sample_bytes()];
            image_edges
                .crop_resize_into(&img, w, h, crop, &s, &mut out)
                .unwrap();
            out
        };
        // The whole image has nothing beyond its edges.
        let whole = window(0.0, 0.0, 160.0, 120.0, false);
        assert_eq!(run(&img, w, h, &whole, &s), run_image(&whole));
        // An inner window: the outermost outputs read past the window with Image edges.
        let inner = window(40.0, 30.0, 80.0, 60.0, true);
        let (cropped, resized) = (run(&img, w, h, &inner, &s), run_image(&inner));
        let mut border_differs = false;
        for y in 0..30 {
            for x in 0..40 {
                let i = (y * 40 + x) * 3;
                let same = cropped[i..i + 3] == resized[i..i + 3];
                if x == 0 || x == 39 || y == 0 || y == 29 {
                    border_differs |= !same;
                } else {
                    assert!(same, "inner pixel ({x}, {y})");
                }
            }
        }
        assert!(border_differs);
    }

    #[test]
    fn steady_state_does_not_reallocate() {
        let (w, h) = (500, 375);
        let img = test_image(w, h);
        let s = spec(224, 224, OutputDtype::F16, Layout::Nchw);
        let mut out = vec![0u8; s.sample_bytes()];
        let mut a = Augmenter::new();
        // The largest work first: the whole image, then a strong downscale.
        a.crop_resize_into(
            &img,
            w,
            h,
            &window(0.0, 0.0, 500.0, 375.0, false),
            &s,
            &mut out,
        )
        .unwrap();
        let buffers = |a: &Augmenter| {
            [
                a.intermediate.as_ptr() as usize,
                a.horizontal.coeffs.as_ptr() as usize,
                a.horizontal.coeffs4.as_ptr() as usize,
                a.horizontal.raw.as_ptr() as usize,
                a.vertical.coeffs.as_ptr() as usize,
                a.output.row_f32.as_ptr() as usize,
                a.output.row_f16.as_ptr() as usize,
                a.output.scale.as_ptr() as usize,
            ]
        };
        let before = buffers(&a);
        let rrc = crate::plan::RandomResizedCrop::default();
        for seed in 0..50 {
            a.crop_resize_into(&img, w, h, &rrc.plan(w, h, seed), &s, &mut out)
                .unwrap();
        }
        assert_eq!(buffers(&a), before);
    }

    #[test]
    fn portable_kernels_match_the_vector_ones() {
        let (w, h) = (1200, 700);
        let img = test_image(w, h);
        let crops = [
            window(0.0, 0.0, 1200.0, 700.0, false), // 5.4x / 3.1x down: the any-width kernels
            window(13.0, 7.0, 301.0, 260.0, true),  // 1.3x down
            window(500.0, 100.0, 200.0, 237.0, false), // vertical pass first
            window(1190.0, 690.0, 10.0, 10.0, true), // upscale at the image's last pixel
            window(0.5, 3.25, 1199.0, 600.5, false), // fractional edges
        ];
        let mut vector = Augmenter::new();
        let mut portable = Augmenter {
            portable_only: true,
            ..Augmenter::new()
        };
        for crop in &crops {
            for (dtype, layout) in [
                (OutputDtype::U8, Layout::Nhwc),
                (OutputDtype::F16, Layout::Nchw),
            ] {
                let s = spec(224, 160, dtype, layout);
                let mut a = vec![0u8; s.sample_bytes()];
                let mut b = vec![0u8; s.sample_bytes()];
                vector
                    .crop_resize_into(&img, w, h, crop, &s, &mut a)
                    .unwrap();
                portable
                    .crop_resize_into(&img, w, h, crop, &s, &mut b)
                    .unwrap();
                assert!(a == b, "{crop:?} {dtype:?}");
            }
        }
    }

    #[test]
    fn scratch_is_reused_across_sizes() {
        let mut a = Augmenter::new();
        let (w, h) = (300, 200);
        let img = test_image(w, h);
        let big = spec(224, 224, OutputDtype::F16, Layout::Nchw);
        let small = spec(32, 16, OutputDtype::F16, Layout::Nchw);
        let crop = window(3.0, 4.0, 250.0, 190.0, false);
        let mut out_big = vec![0u8; big.sample_bytes()];
        let mut out_small = vec![0u8; small.sample_bytes()];
        a.crop_resize_into(&img, w, h, &crop, &big, &mut out_big)
            .unwrap();
        a.crop_resize_into(&img, w, h, &crop, &small, &mut out_small)
            .unwrap();
        assert_eq!(out_small, run(&img, w, h, &crop, &small));
        a.crop_resize_into(&img, w, h, &crop, &big, &mut out_big)
            .unwrap();
        assert_eq!(out_big, run(&img, w, h, &crop, &big));
    }
}
