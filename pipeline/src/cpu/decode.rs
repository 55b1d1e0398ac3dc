//! CPU JPEG decoding for the loader's CPU stage: libjpeg-turbo through its TurboJPEG 3 API
//! (`turbojpeg-sys`, built from the bundled libjpeg-turbo 3.1 source with SIMD and linked
//! statically, so binaries need no libturbojpeg where they run).
//!
//! [`CpuDecoder::decode_for_crop`] does only the work a crop needs: it decodes at the
//! largest DCT-domain scale 1/d (d = 1, 2, 4, 8) that keeps the crop at least as large as
//! the output ([`dct_scale_denominator`]), and only the rows and iMCU columns that cover
//! the crop (libjpeg-turbo's partial decompression), then says where the crop lies in the
//! decoded pixels. Grayscale decodes to RGB; CMYK and YCCK become RGB as Pillow makes them
//! (Adobe-inverted). Every failure is a [`DecodeError`]: the frame size is checked against
//! [`DecodeLimits`] before any pixel buffer is sized, and libjpeg's errors are caught inside
//! the C library (TurboJPEG's setjmp) and come back as values.
//!
//! ```no_run
//! use convnets_pipeline::cpu::decode::{CpuDecoder, DecodeLimits, RgbImage};
//! use convnets_pipeline::plan::CenterCrop;
//! # fn run(jpeg: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
//! let mut decoder = CpuDecoder::new(DecodeLimits::default())?;
//! let mut pixels = RgbImage::default(); // reused for every image
//! let (width, height) = decoder.header(jpeg)?;
//! let crop = CenterCrop::default().plan(width, height);
//! let window = decoder.decode_for_crop(jpeg, &crop, 224, 224, &mut pixels)?;
//! // `window` is `crop` in `pixels`' coordinates: resample that region to 224x224.
//! # Ok(()) }
//! ```

use std::ffi::{c_int, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use turbojpeg_sys as tj;

use crate::plan::{dct_scale_denominator, CropWindow};
use crate::{Error, Result};

/// Decoded pixels, RGB interleaved u8 (HWC), reused across images: `data` is exactly
/// `width * height * 3` bytes after a decode, and its capacity only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// The pixel at column `x`, row `y`; `None` outside the image.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        let p = self.data.get(i..i + 3)?;
        Some([p[0], p[1], p[2]])
    }
}

/// What the decoder refuses before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Frames whose header claims more pixels (width x height) are rejected before any
    /// buffer is sized; the same default as the packer (PIL's `MAX_IMAGE_PIXELS`).
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_pixels: convnets_formats::DEFAULT_MAX_PIXELS,
        }
    }
}

/// Why a JPEG could not be decoded. The loader adds which shard and record it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("image of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    TooLarge { width: u32, height: u32, limit: u64 },
    #[error("corrupt JPEG: {0}")]
    Corrupt(String),
    #[error("unsupported JPEG: {0}")]
    Unsupported(String),
}

/// Colour space of the JPEG's components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JpegColorSpace {
    Gray,
    YCbCr,
    /// Three components stored as RGB (Adobe transform 0).
    Rgb,
    /// Four components, stored inverted by Adobe's convention.
    Cmyk,
    /// YCbCr plus K (Adobe transform 2).
    Ycck,
}

/// Chroma subsampling as TurboJPEG classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JpegSubsampling {
    S444,
    S422,
    S420,
    Gray,
    S440,
    S411,
    S441,
    /// Sampling factors TurboJPEG does not recognise: decodable, but not partially.
    Unknown,
}

impl JpegSubsampling {
    /// Width of an iMCU in pixels (TurboJPEG's `tjMCUWidth`, a static in its header and
    /// so not linkable); `None` when unknown.
    fn mcu_width(self) -> Option<u32> {
        match self {
            Self::S444 | Self::Gray | Self::S440 | Self::S441 => Some(8),
            Self::S422 | Self::S420 => Some(16),
            Self::S411 => Some(32),
            Self::Unknown => None,
        }
    }
}

/// What the header says, without decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegHeader {
    pub width: u32,
    pub height: u32,
    pub color_space: JpegColorSpace,
    pub subsampling: JpegSubsampling,
    /// Bits per sample; only 8 is decoded.
    pub precision: u8,
    pub progressive: bool,
    pub lossless: bool,
}

/// Scans a progressive JPEG may have: real files have about 10, while a crafted one with
/// thousands makes the decoder loop over the whole coefficient buffer for each.
const MAX_PROGRESSIVE_SCANS: c_int = 500;

/// Extra pixels (at the decode scale) decoded around the crop, so that libjpeg's
/// simplified upsampling at the edges of a partial decode stays outside the crop and a
/// resampler may read one neighbour beyond it.
const CROP_MARGIN: u32 = 2;

/// TurboJPEG's `TJUNCROPPED` (a static in its header, so not linkable): decode everything.
const UNCROPPED: tj::tjregion = tj::tjregion {
    x: 0,
    y: 0,
    w: 0,
    h: 0,
};

/// A JPEG decoder owning one TurboJPEG decompression handle; one per loader worker,
/// reused for every image (the handle keeps libjpeg's state and buffers warm).
#[derive(Debug)]
pub struct CpuDecoder {
    handle: Handle,
    limits: DecodeLimits,
}

impl CpuDecoder {
    pub fn new(limits: DecodeLimits) -> Result<Self> {
        if limits.max_pixels == 0 {
            return Err(Error::Config(
                "DecodeLimits::max_pixels must be positive".into(),
            ));
        }
        let handle =
            Handle::open(limits).map_err(|e| Error::DecoderStart(format!("TurboJPEG: {e}")))?;
        Ok(Self { handle, limits })
    }

    pub fn limits(&self) -> DecodeLimits {
        self.limits
    }

    /// Decodes the part of `jpeg` that `crop` (in full-image pixel coordinates) needs, at
    /// the largest DCT scale 1/d (d in 1, 2, 4, 8) that keeps the crop >= `out_w` x `out_h`
    /// ([`dct_scale_denominator`]), and only the rows and columns covering the crop plus a
    /// small margin (libjpeg-turbo's partial decode; the left edge moves down to an iMCU
    /// boundary), into `out`. Returns the crop window in `out`'s pixel coordinates (scaled
    /// and shifted: `x' = x / d - left`), so the resize step samples the same source region.
    ///
    /// Lossless JPEGs decode at scale 1, unknown subsamplings without cropping; a crop that
    /// is empty or not finite decodes the whole (scaled) image.
    pub fn decode_for_crop(
        &mut self,
        jpeg: &[u8],
        crop: &CropWindow,
        out_w: u32,
        out_h: u32,
        out: &mut RgbImage,
    ) -> Result<CropWindow, DecodeError> {
        guard(|| self.decode_for_crop_inner(jpeg, crop, out_w, out_h, out))
    }

    /// Full decode at scale 1 (the reference path, and for tests).
    pub fn decode_full(&mut self, jpeg: &[u8], out: &mut RgbImage) -> Result<(), DecodeError> {
        guard(|| {
            let header = self.header_checked(jpeg)?;
            let region = Region::whole(header.width, header.height);
            self.decode_region(jpeg, &header, 1, region, out)
        })
    }

    /// Width and height from the header, without decoding.
    pub fn header(&mut self, jpeg: &[u8]) -> Result<(u32, u32), DecodeError> {
        let h = self.header_info(jpeg)?;
        Ok((h.width, h.height))
    }

    /// The whole header: size, colour space, subsampling, coding process. Does not apply
    /// the pixel limit (decoding does).
    pub fn header_info(&mut self, jpeg: &[u8]) -> Result<JpegHeader, DecodeError> {
        guard(|| self.read_header(jpeg))
    }

    /// Replaces the handle after a failed call. libjpeg-turbo does not always reset its
    /// state after an error (tj3DecompressHeader returns from its error handler without
    /// aborting the decompression, and the next image is then read as the rest of the
    /// broken header), so a fresh handle keeps one bad record from failing all later
    /// ones. Errors are rare; the cost (a few allocations) does not matter.
    fn reset(&mut self) {
        if let Ok(handle) = Handle::open(self.limits) {
            self.handle = handle;
        }
    }

    fn decode_for_crop_inner(
        &mut self,
        jpeg: &[u8],
        crop: &CropWindow,
        out_w: u32,
        out_h: u32,
        out: &mut RgbImage,
    ) -> Result<CropWindow, DecodeError> {
        let header = self.header_checked(jpeg)?;
        let denom = if header.lossless {
            1 // DCT scaling does not apply to lossless JPEG
        } else {
            dct_scale_denominator(crop, out_w, out_h)
        };
        let whole = Region::whole(header.width.div_ceil(denom), header.height.div_ceil(denom));
        let region = match (header.lossless, header.subsampling.mcu_width()) {
            (false, Some(mcu_width)) => {
                let align = column_alignment(mcu_width, scan_frame_header(jpeg), denom);
                crop_region(crop, denom, whole, align)
            }
            _ => whole,
        };
        let result = self.decode_region(jpeg, &header, denom, region, out);
        let region = match result {
            Ok(()) => region,
            // A partial decode libjpeg-turbo refuses (odd sampling factors) is retried whole;
            // a corrupt file fails again and reports the whole decode's error.
            Err(_) if region != whole => {
                self.decode_region(jpeg, &header, denom, whole, out)?;
                whole
            }
            Err(e) => return Err(e),
        };
        let d = f64::from(denom);
        Ok(CropWindow {
            x: crop.x / d - f64::from(region.x),
            y: crop.y / d - f64::from(region.y),
            width: crop.width / d,
            height: crop.height / d,
            flip: crop.flip,
        })
    }

    /// The header, refused if it is over the pixel limit or of a kind not decoded here.
    fn header_checked(&mut self, jpeg: &[u8]) -> Result<JpegHeader, DecodeError> {
        let header = self.read_header(jpeg)?;
        let pixels = u64::from(header.width) * u64::from(header.height);
        if pixels > self.limits.max_pixels {
            return Err(DecodeError::TooLarge {
                width: header.width,
                height: header.height,
                limit: self.limits.max_pixels,
            });
        }
        if header.precision != 8 {
            return Err(DecodeError::Unsupported(format!(
                "{}-bit samples (only 8-bit JPEG is decoded)",
                header.precision
            )));
        }
        Ok(header)
    }

    fn read_header(&mut self, jpeg: &[u8]) -> Result<JpegHeader, DecodeError> {
        if jpeg.is_empty() {
            return Err(DecodeError::Corrupt("empty input".into()));
        }
        // SAFETY: the handle is valid; TurboJPEG reads `jpeg.len()` bytes from the slice.
        let rc = unsafe { tj::tj3DecompressHeader(self.handle.0, jpeg.as_ptr(), jpeg.len() as _) };
        if let Err(e) = self.handle.check(rc, jpeg) {
            self.reset();
            return Err(e);
        }
        // A tables-only stream (no frame) makes TurboJPEG return success and leave the
        // previous image's values in place.
        if scan_frame_header(jpeg) == FrameScan::TablesOnly {
            return Err(DecodeError::Corrupt(
                "no image in the data (tables only)".into(),
            ));
        }
        let h = &self.handle;
        let (width, height) = (
            h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH),
            h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
        );
        let (Ok(width), Ok(height)) = (u32::try_from(width), u32::try_from(height)) else {
            return Err(DecodeError::Corrupt(format!(
                "invalid size {width}x{height}"
            )));
        };
        if width == 0 || height == 0 {
            return Err(DecodeError::Corrupt(format!(
                "invalid size {width}x{height}"
            )));
        }
        let color_space = match h.get(tj::TJPARAM_TJPARAM_COLORSPACE) as tj::TJCS {
            tj::TJCS_TJCS_GRAY => JpegColorSpace::Gray,
            tj::TJCS_TJCS_YCbCr => JpegColorSpace::YCbCr,
            tj::TJCS_TJCS_RGB => JpegColorSpace::Rgb,
            tj::TJCS_TJCS_CMYK => JpegColorSpace::Cmyk,
            tj::TJCS_TJCS_YCCK => JpegColorSpace::Ycck,
            other => {
                return Err(DecodeError::Unsupported(format!(
                    "colour space code {other}"
                )));
            }
        };
        let subsampling = match h.get(tj::TJPARAM_TJPARAM_SUBSAMP) {
            tj::TJSAMP_TJSAMP_444 => JpegSubsampling::S444,
            tj::TJSAMP_TJSAMP_422 => JpegSubsampling::S422,
            tj::TJSAMP_TJSAMP_420 => JpegSubsampling::S420,
            tj::TJSAMP_TJSAMP_GRAY => JpegSubsampling::Gray,
            tj::TJSAMP_TJSAMP_440 => JpegSubsampling::S440,
            tj::TJSAMP_TJSAMP_411 => JpegSubsampling::S411,
            tj::TJSAMP_TJSAMP_441 => JpegSubsampling::S441,
            _ => JpegSubsampling::Unknown,
        };
        Ok(JpegHeader {
            width,
            height,
            color_space,
            subsampling,
            precision: u8::try_from(h.get(tj::TJPARAM_TJPARAM_PRECISION)).unwrap_or(0),
            progressive: h.get(tj::TJPARAM_TJPARAM_PROGRESSIVE) != 0,
            lossless: h.get(tj::TJPARAM_TJPARAM_LOSSLESS) != 0,
        })
    }

    /// Decodes `region` (in coordinates of the image scaled by 1/`denom`) into `out`.
    /// `header` must be the one just read from `jpeg` by this handle.
    fn decode_region(
        &mut self,
        jpeg: &[u8],
        header: &JpegHeader,
        denom: u32,
        region: Region,
        out: &mut RgbImage,
    ) -> Result<(), DecodeError> {
        let whole = Region::whole(header.width.div_ceil(denom), header.height.div_ceil(denom));
        let h = &mut self.handle;
        let scaling = tj::tjscalingfactor {
            num: 1,
            denom: denom as c_int,
        };
        // SAFETY: valid handle; plain values.
        let rc = unsafe { tj::tj3SetScalingFactor(h.0, scaling) };
        h.check_setup(rc)?;
        let cropping = if region == whole {
            UNCROPPED
        } else {
            tj::tjregion {
                x: region.x as c_int,
                y: region.y as c_int,
                w: region.width as c_int,
                h: region.height as c_int,
            }
        };
        // SAFETY: valid handle; TurboJPEG validates the region against the header it read.
        let rc = unsafe { tj::tj3SetCroppingRegion(h.0, cropping) };
        h.check_setup(rc)?;

        let cmyk = matches!(
            header.color_space,
            JpegColorSpace::Cmyk | JpegColorSpace::Ycck
        );
        let (format, channels) = if cmyk {
            // TurboJPEG has no CMYK -> RGB conversion: decode CMYK, convert below.
            (tj::TJPF_TJPF_CMYK, 4usize)
        } else {
            // Grayscale is replicated into RGB by libjpeg.
            (tj::TJPF_TJPF_RGB, 3usize)
        };
        let (width, height) = (region.width as usize, region.height as usize);
        // Within the pixel limit (checked against the full frame), so this cannot overflow.
        let pitch = width * channels;
        // `resize` writes only bytes beyond the current length: no per-image memset.
        out.data.resize(pitch * height, 0);
        out.width = region.width;
        out.height = region.height;
        // SAFETY: valid handle; `out.data` holds `height` rows of `pitch` bytes, exactly what
        // TurboJPEG writes for this scaling factor and cropping region (the output size
        // follows from the header read from the same bytes just before).
        let rc = unsafe {
            tj::tj3Decompress8(
                h.0,
                jpeg.as_ptr(),
                jpeg.len() as _,
                out.data.as_mut_ptr(),
                pitch as c_int,
                format,
            )
        };
        if let Err(e) = h.check(rc, jpeg) {
            out.width = 0;
            out.height = 0;
            out.data.clear();
            self.reset();
            return Err(e);
        }
        if cmyk {
            cmyk_to_rgb_in_place(&mut out.data);
        }
        Ok(())
    }
}

/// Runs a decoder call, turning a panic (a bug, never expected) into an error, so that one
/// bad record cannot take a loader worker down.
fn guard<T>(f: impl FnOnce() -> Result<T, DecodeError>) -> Result<T, DecodeError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(DecodeError::Corrupt(format!("decoder panicked: {msg}")))
    })
}

/// A rectangle of the (scaled) image, in whole pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    x: u32,
    y: u32,
    width: u32,
    height: u32,
}

impl Region {
    fn whole(width: u32, height: u32) -> Self {
        Self {
            x: 0,
            y: 0,
            width,
            height,
        }
    }
}

/// The part of the image scaled by 1/`denom` (of size `whole`) to decode for `crop`: the
/// crop's pixels plus [`CROP_MARGIN`], the left edge moved down to a multiple of `align`.
fn crop_region(crop: &CropWindow, denom: u32, whole: Region, align: u32) -> Region {
    let d = f64::from(denom);
    let (x0, y0) = (crop.x / d, crop.y / d);
    let (x1, y1) = ((crop.x + crop.width) / d, (crop.y + crop.height) / d);
    let finite = [x0, y0, x1, y1].iter().all(|v| v.is_finite());
    if !finite || x1 <= x0 || y1 <= y0 {
        return whole;
    }
    let margin = f64::from(CROP_MARGIN);
    // Float-to-int `as` saturates (and clamps below at 0), so these stay in range.
    let left = ((x0 - margin).floor().max(0.0) as u32).min(whole.width);
    let top = ((y0 - margin).floor().max(0.0) as u32).min(whole.height);
    let right = ((x1 + margin).ceil().max(0.0) as u32).min(whole.width);
    let bottom = ((y1 + margin).ceil().max(0.0) as u32).min(whole.height);
    if right <= left || bottom <= top {
        return whole; // the crop lies outside the image: decode it all
    }
    let left = left - left % align.max(1);
    Region {
        x: left,
        y: top,
        width: right - left,
        height: bottom - top,
    }
}

/// The column alignment of a partial decode at scale 1/`denom`: TurboJPEG checks the
/// left edge against its iMCU width for the subsampling (`mcu_width`, scaled), libjpeg
/// against the frame's real one (largest horizontal sampling factor x 8, scaled); they
/// differ for equivalent-but-unusual sampling factors, so satisfy both.
fn column_alignment(mcu_width: u32, max_h_samp: FrameScan, denom: u32) -> u32 {
    let turbo = mcu_width.div_ceil(denom);
    let libjpeg = match max_h_samp {
        FrameScan::Found { max_h_samp } => u32::from(max_h_samp.max(1)) * (8 / denom).max(1),
        _ => turbo,
    };
    lcm(turbo.max(1), libjpeg.max(1))
}

fn lcm(a: u32, b: u32) -> u32 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// What a walk over the header segments finds before the first scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameScan {
    /// A frame header, with its largest horizontal sampling factor.
    Found { max_h_samp: u8 },
    /// End of image before any frame: an abbreviated tables-only stream.
    TablesOnly,
    /// Anything else (not a JPEG, cut short, a scan before the frame): libjpeg decides.
    Unknown,
}

/// Walks the marker segments after SOI up to the frame header. Header segments only, so
/// this is cheap; bytes between segments are skipped as libjpeg skips them.
fn scan_frame_header(jpeg: &[u8]) -> FrameScan {
    if !jpeg.starts_with(&[0xFF, 0xD8]) {
        return FrameScan::Unknown;
    }
    let mut pos = 2;
    loop {
        // Find the next marker: 0xFF (any number of fill bytes), then a code other than 0.
        while jpeg.get(pos).is_some_and(|&b| b != 0xFF) {
            pos += 1;
        }
        while jpeg.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&marker) = jpeg.get(pos) else {
            return FrameScan::Unknown;
        };
        pos += 1;
        match marker {
            0x00 | 0x01 | 0xD0..=0xD8 => continue, // no segment follows
            0xD9 => return FrameScan::TablesOnly,
            0xDA => return FrameScan::Unknown,
            _ => {}
        }
        let Some(len) = jpeg
            .get(pos..pos + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return FrameScan::Unknown;
        };
        let is_sof = (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            // length(2) precision(1) height(2) width(2) count(1), then 3 bytes a component.
            let Some(&count) = jpeg.get(pos + 7) else {
                return FrameScan::Unknown;
            };
            let comps = pos + 8..pos + 8 + 3 * usize::from(count);
            return match jpeg.get(comps) {
                Some(c) if count > 0 => FrameScan::Found {
                    max_h_samp: c.chunks_exact(3).map(|c| c[1] >> 4).max().unwrap_or(1),
                },
                _ => FrameScan::Unknown,
            };
        }
        if len < 2 {
            return FrameScan::Unknown;
        }
        pos += len;
    }
}

/// CMYK as libjpeg-turbo returns it (the stored values, which Adobe files store
/// inverted) to RGB, as Pillow does for every 4-component JPEG: it reads them as
/// "CMYK;I" (C = 255 - stored) and converts with R = (255 - C)(255 - K) / 255, i.e.
/// R = stored_C * stored_K / 255, rounded the way Pillow's MULDIV255 rounds. In place:
/// `data` shrinks from 4 to 3 bytes a pixel (each write lands at or before its read).
fn cmyk_to_rgb_in_place(data: &mut Vec<u8>) {
    let pixels = data.len() / 4;
    for i in 0..pixels {
        let (s, d) = (4 * i, 3 * i);
        let k = u32::from(data[s + 3]);
        let [c, m, y] = [data[s], data[s + 1], data[s + 2]].map(|v| muldiv255(u32::from(v), k));
        data[d] = c;
        data[d + 1] = m;
        data[d + 2] = y;
    }
    data.truncate(pixels * 3);
}

/// Pillow's MULDIV255: a * b / 255, rounded.
fn muldiv255(a: u32, b: u32) -> u8 {
    let t = a * b + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Owns a TurboJPEG decompression handle.
#[derive(Debug)]
struct Handle(tj::tjhandle);

// SAFETY: a TurboJPEG handle may be used from any thread, one at a time; `CpuDecoder`
// takes `&mut self` for every call, so it is never shared.
unsafe impl Send for Handle {}

impl Handle {
    /// A decompression handle set up for `limits`.
    fn open(limits: DecodeLimits) -> Result<Self, String> {
        // SAFETY: plain constructor; a null return is an allocation failure.
        let raw = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if raw.is_null() {
            // SAFETY: with a null handle TurboJPEG reports its global (thread-local) message.
            return Err(unsafe { error_string(std::ptr::null_mut()) });
        }
        let handle = Self(raw);
        // libjpeg-turbo checks the limit too, on every decode (a second line of defence);
        // 0 is no limit there, for limits it cannot hold (ours still applies).
        let max_pixels = c_int::try_from(limits.max_pixels).unwrap_or(0);
        for (param, value) in [
            (tj::TJPARAM_TJPARAM_MAXPIXELS, max_pixels),
            (tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_PROGRESSIVE_SCANS),
            // Warnings (e.g. extraneous bytes between markers) do not stop a decode.
            (tj::TJPARAM_TJPARAM_STOPONWARNING, 0),
            // No ICC profile extraction: nothing here applies it.
            (tj::TJPARAM_TJPARAM_SAVEMARKERS, 0),
        ] {
            handle.set(param, value)?;
        }
        Ok(handle)
    }

    fn set(&self, param: tj::TJPARAM, value: c_int) -> Result<(), String> {
        // SAFETY: valid handle.
        if unsafe { tj::tj3Set(self.0, param as c_int, value) } == 0 {
            Ok(())
        } else {
            // SAFETY: valid handle.
            Err(unsafe { error_string(self.0) })
        }
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: valid handle.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }

    /// The result of a parameter call (scaling factor, cropping region): no data involved.
    fn check_setup(&mut self, rc: c_int) -> Result<(), DecodeError> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: valid handle.
        Err(DecodeError::Unsupported(unsafe { error_string(self.0) }))
    }

    /// The result of a call that read `jpeg`. TurboJPEG returns -1 both for errors and
    /// for warnings, and its error code says "warning" whenever a warning was raised, even
    /// if a fatal error followed. The message tells them apart: libjpeg keeps the first
    /// warning's text unless a fatal error overwrites it. Warnings are not errors (Pillow
    /// ignores them too), except the one that means the data ends early: a truncated file
    /// is refused, as Pillow refuses it.
    fn check(&mut self, rc: c_int, jpeg: &[u8]) -> Result<(), DecodeError> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: valid handle.
        let (code, msg) = unsafe { (tj::tj3GetErrorCode(self.0), error_string(self.0)) };
        if code != tj::TJERR_TJERR_WARNING as c_int || !is_libjpeg_warning(&msg) {
            return Err(classify_error(msg));
        }
        // Only the first warning is kept: a later "premature end" would be hidden behind
        // e.g. an extraneous-bytes warning, so also look for an EOI after the last scan.
        let cut = msg.starts_with("Premature end of JPEG file")
            || convnets_formats::jpeg::parse_header(jpeg).is_ok_and(|info| !info.has_eoi);
        if cut {
            return Err(DecodeError::Corrupt(format!("truncated data ({msg})")));
        }
        Ok(())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

/// TurboJPEG's message for the last call on `handle`, on one line.
///
/// # Safety
/// `handle` is a live TurboJPEG handle or null.
unsafe fn error_string(handle: tj::tjhandle) -> String {
    // SAFETY: TurboJPEG returns a NUL-terminated string it owns (in the handle or
    // thread-local), valid until the next call on this thread; it is copied at once.
    let ptr = unsafe { tj::tj3GetErrorStr(handle) };
    if ptr.is_null() {
        return "unknown TurboJPEG error".into();
    }
    // SAFETY: as above.
    let msg = unsafe { CStr::from_ptr(ptr) }.to_string_lossy();
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The texts of libjpeg's warnings (JWRN_* in jerror.h); any other message is an error.
fn is_libjpeg_warning(msg: &str) -> bool {
    const WARNINGS: [&str; 8] = [
        "Corrupt JPEG data:",
        "Premature end of JPEG file",
        "Unknown Adobe color transform code",
        "Inconsistent progression sequence",
        "Warning: unknown JFIF revision number",
        "Invalid SOS parameters for sequential JPEG",
        "Application transferred too many scanlines",
        "Warning: thumbnail image size does not match",
    ];
    WARNINGS.iter().any(|w| msg.starts_with(w))
}

/// libjpeg and TurboJPEG errors: a few say the file is valid but of a kind not decoded
/// here; the rest mean the data is bad.
fn classify_error(msg: String) -> DecodeError {
    const UNSUPPORTED: [&str; 4] = [
        "Unsupported JPEG data precision",
        "Unsupported color conversion request",
        "Requested features are incompatible",
        "Unsupported JPEG process",
    ];
    if UNSUPPORTED.iter().any(|u| msg.starts_with(u)) {
        DecodeError::Unsupported(msg)
    } else {
        DecodeError::Corrupt(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RandomResizedCrop;
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
    use proptest::prelude::*;

    /// A photo-like test scene: smooth gradients, hard edges and a little noise, so the
    /// JPEG has realistic content at every frequency.
    fn scene(width: u32, height: u32) -> Vec<u8> {
        let mut px = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
                let noise = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663)) % 13;
                let noise = noise as f32 - 6.0;
                let disk = ((fx - 0.6).powi(2) + (fy - 0.4).powi(2)) < 0.05;
                let checker = ((x / 37) + (y / 29)) % 2 == 0;
                let r = 128.0 + 100.0 * (6.0 * fx + 3.0 * fy).sin() + noise;
                let g = if disk { 230.0 } else { 40.0 + 150.0 * fy } + noise;
                let b = if checker { 60.0 } else { 190.0 } + 30.0 * fx + noise;
                px.extend([r, g, b].map(|v| v.clamp(0.0, 255.0) as u8));
            }
        }
        px
    }

    fn encode(
        pixels: &[u8],
        (width, height): (u32, u32),
        color: ColorType,
        sampling: SamplingFactor,
        progressive: bool,
    ) -> Vec<u8> {
        let mut jpeg = Vec::new();
        let mut encoder = Encoder::new(&mut jpeg, 90);
        encoder.set_sampling_factor(sampling);
        encoder.set_progressive(progressive);
        encoder
            .encode(pixels, width as u16, height as u16, color)
            .expect("encode fixture");
        jpeg
    }

    fn rgb_jpeg(size: (u32, u32), sampling: SamplingFactor, progressive: bool) -> Vec<u8> {
        encode(
            &scene(size.0, size.1),
            size,
            ColorType::Rgb,
            sampling,
            progressive,
        )
    }

    fn cmyk_jpeg(size: (u32, u32), color: ColorType) -> Vec<u8> {
        let cmyk: Vec<u8> = scene(size.0, size.1)
            .chunks(3)
            .flat_map(|p| [255 - p[0], 255 - p[1], 255 - p[2], p[0] / 3])
            .collect();
        encode(&cmyk, size, color, SamplingFactor::R_4_2_0, false)
    }

    /// The `image` crate's decode (zune-jpeg), as RGB.
    fn reference(jpeg: &[u8]) -> image::RgbImage {
        image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
            .expect("reference decode")
            .to_rgb8()
    }

    fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        let sum: u64 = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| u64::from(x.abs_diff(y)))
            .sum();
        sum as f64 / a.len() as f64
    }

    fn decoder() -> CpuDecoder {
        CpuDecoder::new(DecodeLimits::default()).expect("decoder")
    }

    fn decode_full(jpeg: &[u8]) -> RgbImage {
        let mut out = RgbImage::default();
        decoder().decode_full(jpeg, &mut out).expect("decode");
        out
    }

    /// The whole image decoded at scale 1/`denom` (no cropping).
    fn decode_scaled(dec: &mut CpuDecoder, jpeg: &[u8], denom: u32) -> RgbImage {
        let mut out = RgbImage::default();
        let header = dec.header_checked(jpeg).expect("header");
        let whole = Region::whole(header.width.div_ceil(denom), header.height.div_ceil(denom));
        dec.decode_region(jpeg, &header, denom, whole, &mut out)
            .expect("decode");
        out
    }

    /// Offset of the frame header's marker (0xFF, SOFn).
    fn sof_offset(jpeg: &[u8]) -> usize {
        let mut pos = 2;
        loop {
            let marker = jpeg[pos + 1];
            if (0xC0..=0xC2).contains(&marker) {
                return pos;
            }
            pos += 2 + usize::from(u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]));
        }
    }

    fn full_crop(width: u32, height: u32) -> CropWindow {
        CropWindow {
            x: 0.0,
            y: 0.0,
            width: f64::from(width),
            height: f64::from(height),
            flip: false,
        }
    }

    // Mean absolute error against the `image` crate (zune-jpeg: another IDCT and chroma
    // upsampler) must stay under 1 level of 255 on every fixture (measured: 0.34 at
    // 4:2:0, 0.16 at 4:2:2, 0.01 at 4:4:4, grayscale and CMYK/YCCK).
    const MAX_MAE_VS_IMAGE_CRATE: f64 = 1.0;

    #[test]
    fn colour_jpegs_match_the_image_crate() {
        let size = (203, 157); // not a multiple of any iMCU
        for sampling in [
            SamplingFactor::R_4_2_0,
            SamplingFactor::R_4_2_2,
            SamplingFactor::R_4_4_4,
        ] {
            for progressive in [false, true] {
                let jpeg = rgb_jpeg(size, sampling, progressive);
                let ours = decode_full(&jpeg);
                assert_eq!((ours.width, ours.height), size);
                assert_eq!(ours.data.len(), (size.0 * size.1 * 3) as usize);
                let mae = mean_abs_diff(&ours.data, reference(&jpeg).as_raw());
                assert!(
                    mae < MAX_MAE_VS_IMAGE_CRATE,
                    "{sampling:?} progressive={progressive}: {mae}"
                );
            }
        }
    }

    #[test]
    fn grayscale_decodes_to_replicated_rgb() {
        let size = (150, 99);
        let luma: Vec<u8> = scene(size.0, size.1).chunks(3).map(|p| p[1]).collect();
        let jpeg = encode(&luma, size, ColorType::Luma, SamplingFactor::R_4_4_4, false);
        let header = decoder().header_info(&jpeg).expect("header");
        assert_eq!(header.color_space, JpegColorSpace::Gray);
        let ours = decode_full(&jpeg);
        assert!(ours.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        let mae = mean_abs_diff(&ours.data, reference(&jpeg).as_raw());
        assert!(mae < MAX_MAE_VS_IMAGE_CRATE, "{mae}");
    }

    #[test]
    fn cmyk_and_ycck_decode_like_pillow() {
        let size = (120, 88);
        let rgb = scene(size.0, size.1);
        // Ink amounts: C, M, Y from the scene, K a gradient.
        let cmyk: Vec<u8> = rgb
            .chunks(3)
            .enumerate()
            .flat_map(|(i, p)| [255 - p[0], 255 - p[1], 255 - p[2], ((i % 120) * 2) as u8])
            .collect();
        // What Pillow gives: R = (255 - C)(255 - K) / 255.
        let expected: Vec<u8> = cmyk
            .chunks(4)
            .flat_map(|p| {
                let k = 255 - u32::from(p[3]);
                [0, 1, 2].map(|c| ((255 - u32::from(p[c])) * k / 255) as u8)
            })
            .collect();
        for (color, space) in [
            (ColorType::Cmyk, JpegColorSpace::Cmyk),
            (ColorType::CmykAsYcck, JpegColorSpace::Ycck),
        ] {
            let jpeg = encode(&cmyk, size, color, SamplingFactor::R_4_4_4, false);
            assert_eq!(
                decoder().header_info(&jpeg).expect("header").color_space,
                space
            );
            let ours = decode_full(&jpeg);
            assert_eq!(ours.data.len(), (size.0 * size.1 * 3) as usize);
            let mae = mean_abs_diff(&ours.data, reference(&jpeg).as_raw());
            assert!(
                mae < MAX_MAE_VS_IMAGE_CRATE,
                "{space:?} vs image crate: {mae}"
            );
            let mae = mean_abs_diff(&ours.data, &expected);
            assert!(mae < 3.0, "{space:?} vs source pixels: {mae}");
        }
    }

    #[test]
    fn dct_scaling_halves_sizes_and_resembles_a_box_downscale() {
        let (w, h) = (203u32, 157u32);
        for progressive in [false, true] {
            let jpeg = rgb_jpeg((w, h), SamplingFactor::R_4_2_0, progressive);
            let full = decode_full(&jpeg);
            let mut dec = decoder();
            for d in [2u32, 4, 8] {
                let mut out = RgbImage::default();
                let crop = full_crop(w, h);
                let window = dec
                    .decode_for_crop(&jpeg, &crop, w / d, h / d, &mut out)
                    .expect("scaled decode");
                assert_eq!(
                    (out.width, out.height),
                    (w.div_ceil(d), h.div_ceil(d)),
                    "d={d}"
                );
                let (wd, hd) = (f64::from(w) / f64::from(d), f64::from(h) / f64::from(d));
                assert_eq!(
                    (window.x, window.y, window.width, window.height),
                    (0.0, 0.0, wd, hd)
                );
                // Box average of the full decode over each d x d cell (clipped at the edges).
                let mut boxed = Vec::with_capacity(out.data.len());
                for by in 0..out.height {
                    for bx in 0..out.width {
                        let mut sum = [0u32; 3];
                        let mut n = 0;
                        for y in by * d..((by + 1) * d).min(h) {
                            for x in bx * d..((bx + 1) * d).min(w) {
                                let p = full.pixel(x, y).expect("inside");
                                (0..3).for_each(|c| sum[c] += u32::from(p[c]));
                                n += 1;
                            }
                        }
                        boxed.extend(sum.map(|s| ((s + n / 2) / n) as u8));
                    }
                }
                let mae = mean_abs_diff(&out.data, &boxed);
                // DCT scaling keeps a block's low frequencies rather than averaging: at 1/8
                // (the DC term) it is the box mean up to quantisation; at 1/2 the scene's
                // pixel noise makes the most difference (measured: 2.2, 1.1, 0.7).
                let bound = match d {
                    2 => 3.0,
                    4 => 2.0,
                    _ => 1.5,
                };
                assert!(mae < bound, "d={d} progressive={progressive}: {mae}");
            }
        }
    }

    #[test]
    fn crop_aware_decode_maps_onto_the_same_pixels() {
        let size = (500u32, 375u32);
        let fixtures = [
            ("4:2:0", rgb_jpeg(size, SamplingFactor::R_4_2_0, false)),
            ("4:2:2", rgb_jpeg(size, SamplingFactor::R_4_2_2, false)),
            ("4:4:4", rgb_jpeg(size, SamplingFactor::R_4_4_4, false)),
            ("progressive", rgb_jpeg(size, SamplingFactor::R_4_2_0, true)),
            ("gray", {
                let luma: Vec<u8> = scene(size.0, size.1).chunks(3).map(|p| p[0]).collect();
                encode(&luma, size, ColorType::Luma, SamplingFactor::R_4_4_4, false)
            }),
            ("YCCK 4:2:0", cmyk_jpeg(size, ColorType::CmykAsYcck)),
            // jpeg-encoder samples CMYK's K at 2x2 and C, M, Y at 1x1: TurboJPEG does not
            // recognise that, so it is decoded whole.
            ("CMYK, odd sampling", cmyk_jpeg(size, ColorType::Cmyk)),
        ];
        let rrc = RandomResizedCrop::default();
        let mut dec = decoder();
        let mut out = RgbImage::default();
        let mut partial = 0;
        for (name, jpeg) in &fixtures {
            let scaled: Vec<RgbImage> = [1, 2, 4, 8]
                .map(|d| decode_scaled(&mut dec, jpeg, d))
                .into();
            for seed in 0..40 {
                let crop = rrc.plan(size.0, size.1, seed);
                let out_side = [224, 112, 64, 32][seed as usize % 4];
                let d = dct_scale_denominator(&crop, out_side, out_side);
                let window = dec
                    .decode_for_crop(jpeg, &crop, out_side, out_side, &mut out)
                    .expect("crop decode");
                let reference = &scaled[d.trailing_zeros() as usize];
                // The window is the crop scaled by 1/d, shifted by whole decoded pixels.
                let (shift_x, shift_y) = (
                    crop.x / f64::from(d) - window.x,
                    crop.y / f64::from(d) - window.y,
                );
                assert_eq!(shift_x.fract(), 0.0, "{name} seed {seed}");
                assert_eq!(shift_y.fract(), 0.0, "{name} seed {seed}");
                assert_eq!(window.width, crop.width / f64::from(d));
                assert!(window.x >= 0.0 && window.y >= 0.0);
                assert!(
                    window.x + window.width <= f64::from(out.width) + 1e-9,
                    "{name} seed {seed}"
                );
                assert!(
                    window.y + window.height <= f64::from(out.height) + 1e-9,
                    "{name} seed {seed}"
                );
                partial += usize::from(out.width * out.height < reference.width * reference.height);
                // Every pixel of the window equals the whole decode's pixel at the same
                // (scaled) source position.
                let (x0, y0) = (window.x.floor() as u32, window.y.floor() as u32);
                let (x1, y1) = (
                    (window.x + window.width).ceil() as u32,
                    (window.y + window.height).ceil() as u32,
                );
                for y in y0..y1.min(out.height) {
                    for x in x0..x1.min(out.width) {
                        let src = reference.pixel(x + shift_x as u32, y + shift_y as u32);
                        assert_eq!(
                            out.pixel(x, y),
                            src,
                            "{name} seed {seed} d={d} at ({x},{y})"
                        );
                    }
                }
            }
        }
        assert!(partial > 150, "partial decodes: {partial}");
    }

    #[test]
    fn oversized_header_is_refused_before_allocating() {
        let mut jpeg = rgb_jpeg((64, 48), SamplingFactor::R_4_2_0, false);
        let sof = sof_offset(&jpeg);
        // SOF: marker(2) length(2) precision(1) height(2) width(2).
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]); // 60000 x 60000
        let mut dec = decoder();
        assert_eq!(dec.header(&jpeg).expect("header"), (60000, 60000));
        let mut out = RgbImage::default();
        let err = dec.decode_full(&jpeg, &mut out).expect_err("too large");
        let limit = DecodeLimits::default().max_pixels;
        assert_eq!(
            err,
            DecodeError::TooLarge {
                width: 60000,
                height: 60000,
                limit
            }
        );
        let err = dec
            .decode_for_crop(&jpeg, &full_crop(60000, 60000), 224, 224, &mut out)
            .expect_err("too large");
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
        assert_eq!(out.data.capacity(), 0);
        assert!(err.to_string().contains("60000x60000"), "{err}");

        // A tighter limit applies to ordinary sizes too.
        let small = rgb_jpeg((64, 48), SamplingFactor::R_4_2_0, false);
        let mut strict = CpuDecoder::new(DecodeLimits { max_pixels: 1000 }).expect("decoder");
        assert!(matches!(
            strict.decode_full(&small, &mut out),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn corrupt_and_truncated_data_are_errors() {
        let jpeg = rgb_jpeg((96, 64), SamplingFactor::R_4_2_0, false);
        let progressive = rgb_jpeg((96, 64), SamplingFactor::R_4_2_0, true);
        let mut dec = decoder();
        let mut out = RgbImage::default();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("not a JPEG", b"GIF89a this is not a jpeg at all".to_vec()),
            ("header only", jpeg[..sof_offset(&jpeg) + 4].to_vec()),
            ("truncated", jpeg[..jpeg.len() / 2].to_vec()),
            ("truncated before EOI", jpeg[..jpeg.len() - 2].to_vec()),
            (
                "truncated progressive",
                progressive[..progressive.len() * 2 / 3].to_vec(),
            ),
            ("tables only", {
                let mut t = jpeg[..sof_offset(&jpeg)].to_vec();
                t.extend([0xFF, 0xD9]);
                t
            }),
        ];
        for (name, bytes) in &cases {
            let err = dec.decode_full(bytes, &mut out).expect_err(name);
            assert!(matches!(err, DecodeError::Corrupt(_)), "{name}: {err}");
            let err = dec
                .decode_for_crop(bytes, &full_crop(96, 64), 32, 32, &mut out)
                .expect_err(name);
            assert!(matches!(err, DecodeError::Corrupt(_)), "{name}: {err}");
            // One bad record does not spoil the decoder for the next.
            // (Truncated files still have a whole header.)
            match dec.header(bytes) {
                Ok(size) => assert!(name.starts_with("truncated") && size == (96, 64), "{name}"),
                Err(err) => assert!(matches!(err, DecodeError::Corrupt(_)), "{name}: {err}"),
            }
            dec.decode_full(&jpeg, &mut out)
                .expect("valid after a bad record");
            assert_eq!((out.width, out.height), (96, 64));
        }
        // A tables-only stream must not report the previous image's size.
        assert!(dec.header(&cases[6].1).is_err());
    }

    #[test]
    fn warnings_are_not_errors() {
        // Junk between two segments: libjpeg warns "extraneous bytes before marker".
        let jpeg = rgb_jpeg((96, 64), SamplingFactor::R_4_2_0, false);
        let sof = sof_offset(&jpeg);
        let mut junk = jpeg[..sof].to_vec();
        junk.extend([0x12, 0x34, 0x56]);
        junk.extend(&jpeg[sof..]);
        // And trailing bytes after EOI.
        junk.extend([0u8; 7]);
        let clean = decode_full(&jpeg);
        let mut out = RgbImage::default();
        decoder()
            .decode_full(&junk, &mut out)
            .expect("warning only");
        assert_eq!(out, clean);
    }

    #[test]
    fn decoder_reuses_its_buffer_across_sizes() {
        let mut dec = decoder();
        let mut out = RgbImage::default();
        let big = rgb_jpeg((300, 200), SamplingFactor::R_4_2_0, false);
        let small = rgb_jpeg((40, 30), SamplingFactor::R_4_4_4, false);
        dec.decode_full(&big, &mut out).expect("big");
        let capacity = out.data.capacity();
        dec.decode_full(&small, &mut out).expect("small");
        assert_eq!(
            (out.width, out.height, out.data.len()),
            (40, 30, 40 * 30 * 3)
        );
        assert_eq!(out.data.capacity(), capacity);
        assert_eq!(out, decode_full(&small));
    }

    #[test]
    fn crop_regions_align_and_stay_inside() {
        let whole = Region::whole(250, 188);
        let crop = CropWindow {
            x: 101.0,
            y: 50.5,
            width: 60.0,
            height: 40.0,
            flip: true,
        };
        let r = crop_region(&crop, 2, whole, 8);
        assert_eq!(
            r,
            Region {
                x: 48,
                y: 23,
                width: 83 - 48,
                height: 48 - 23
            }
        );
        // Outside the image, empty or not finite: the whole image.
        let outside = CropWindow { x: 9000.0, ..crop };
        assert_eq!(crop_region(&outside, 1, whole, 16), whole);
        let nan = CropWindow {
            width: f64::NAN,
            ..crop
        };
        assert_eq!(crop_region(&nan, 1, whole, 16), whole);
        assert_eq!(
            column_alignment(16, FrameScan::Found { max_h_samp: 2 }, 1),
            16
        );
        assert_eq!(
            column_alignment(8, FrameScan::Found { max_h_samp: 2 }, 2),
            8
        );
        assert_eq!(
            column_alignment(16, FrameScan::Found { max_h_samp: 2 }, 8),
            2
        );
        assert_eq!(
            column_alignment(8, FrameScan::Found { max_h_samp: 3 }, 1),
            24
        );
        assert_eq!(column_alignment(8, FrameScan::Unknown, 4), 2);
    }

    #[test]
    fn cmyk_conversion_rounds_like_pillow() {
        let mut data = vec![255, 0, 128, 255, 10, 20, 30, 0, 200, 100, 50, 128];
        cmyk_to_rgb_in_place(&mut data);
        assert_eq!(data, vec![255, 0, 128, 0, 0, 0, 100, 50, 25]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Damaged bytes never panic: every outcome is a decode or a `DecodeError`.
        #[test]
        fn damaged_jpegs_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            progressive in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut jpeg = rgb_jpeg((72, 56), SamplingFactor::R_4_2_0, progressive);
            for (at, value) in edits {
                let i = at.index(jpeg.len());
                jpeg[i] = value;
            }
            if let Some(cut) = cut {
                jpeg.truncate(cut.index(jpeg.len()));
            }
            let mut dec = DECODER.with(|d| d.take()).unwrap_or_else(decoder);
            let mut out = RgbImage::default();
            let crop = RandomResizedCrop::default().plan(72, 56, seed);
            match dec.decode_for_crop(&jpeg, &crop, 16, 16, &mut out) {
                Ok(_) => prop_assert_eq!(out.data.len(), (out.width * out.height * 3) as usize),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            if dec.decode_full(&jpeg, &mut out).is_ok() {
                let (w, h) = dec.header(&jpeg).expect("decoded, so the header reads");
                prop_assert_eq!((out.width, out.height), (w, h));
            }
            // The decoder carries on (it is reused across cases, as a loader worker's is).
            let clean = CLEAN.with(|c| c.clone());
            prop_assert!(dec.decode_full(&clean, &mut out).is_ok());
            DECODER.with(|d| d.set(Some(dec)));
        }
    }

    thread_local! {
        static DECODER: std::cell::Cell<Option<CpuDecoder>> = const { std::cell::Cell::new(None) };
        static CLEAN: Vec<u8> = rgb_jpeg((40, 24), SamplingFactor::R_4_2_2, false);
    }
}
