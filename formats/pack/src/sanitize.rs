//! Input policy for the packer: every file becomes exactly one [`Outcome`], so nothing is
//! dropped without a stated reason.
//!
//! A record must be a JPEG that every decoder in the loader takes, nvJPEG's hardware decoder
//! included: baseline Huffman, 8-bit, 3-component YCbCr in 4:4:4, 4:2:2, 4:2:0 or 4:4:0, with
//! an EOI. Such files are kept byte-identical. Decodable files that miss this ("awkward":
//! grayscale, CMYK, progressive, other formats...) are re-encoded as baseline RGB 4:2:0, or
//! skipped, by policy. Files that cannot be stored (empty, truncated, corrupt, bombs) are
//! rejected. Sizes are checked from headers before anything is decoded or allocated.
//!
//! CMYK: `image` decodes through zune-jpeg, which converts CMYK and YCCK to RGB itself and
//! assumes Adobe's inverted samples (R = C'·K'/255 with C', K' as stored) for every
//! 4-component file, as PIL does; no conversion is needed here.
//!
//! Re-encoding behaves like PIL's `convert("RGB")`: gray is replicated, alpha is dropped,
//! and metadata (EXIF orientation, ICC profiles) is neither applied nor kept.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageError, ImageFormat, ImageReader, Limits, RgbImage};
use serde::Serialize;

use crate::strict_decode;
use convnets_formats::jpeg::{self, ColorSpace, HeaderError, JpegInfo, Process, Subsampling};

pub use convnets_formats::DEFAULT_MAX_PIXELS;

/// Bytes per pixel of the widest decoded layout (RGBA, 16 bits per channel).
const MAX_BYTES_PER_PIXEL: u64 = 8;
/// Allocation allowed beyond the pixel buffer, for decoders' own state (palettes, rows).
const DECODER_HEADROOM: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanitizeOptions {
    /// Files whose header claims more pixels are rejected unread.
    pub max_pixels: u64,
    /// Downscale (re-encoding) when the longer side exceeds this; 0 counts as 1.
    pub max_side: Option<u32>,
    pub awkward: AwkwardPolicy,
    /// JPEG quality (1..=100) of re-encoded images.
    pub quality: u8,
    /// Decode 8-bit Huffman JPEGs in full with libjpeg-turbo, stopping at its first warning
    /// ([`crate::strict_decode`]), so corrupt data is rejected instead of stored or
    /// re-encoded with the damage concealed.
    pub verify_decode: bool,
}

impl Default for SanitizeOptions {
    fn default() -> Self {
        SanitizeOptions {
            max_pixels: DEFAULT_MAX_PIXELS,
            max_side: None,
            awkward: AwkwardPolicy::Reencode,
            quality: 95,
            verify_decode: true,
        }
    }
}

/// What to do with decodable files that are not clean baseline JPEGs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AwkwardPolicy {
    #[default]
    Reencode,
    Skip,
}

/// Why a decodable file is not stored as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Awkward {
    Grayscale,
    /// CMYK or YCCK.
    Cmyk,
    Progressive,
    /// E.g. "4:1:1 (4x1,1x1,1x1)".
    UnusualSubsampling(String),
    /// RGB-coded JPEG (no YCbCr transform) or an odd component count.
    UnusualColorSpace(String),
    /// Lossless, arithmetic, hierarchical, or not 8-bit.
    NonBaseline(String),
    /// Sequential, but one scan per component instead of one interleaved scan.
    NonInterleaved {
        scans: u32,
    },
    /// Another image format; the name, e.g. "png".
    NotJpeg(String),
    TooLargeSide {
        width: u32,
        height: u32,
        max_side: u32,
    },
}

impl Awkward {
    /// Stable machine-readable name, as in the JSON `kind` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Awkward::Grayscale => "grayscale",
            Awkward::Cmyk => "cmyk",
            Awkward::Progressive => "progressive",
            Awkward::UnusualSubsampling(_) => "unusual_subsampling",
            Awkward::UnusualColorSpace(_) => "unusual_color_space",
            Awkward::NonBaseline(_) => "non_baseline",
            Awkward::NonInterleaved { .. } => "non_interleaved",
            Awkward::NotJpeg(_) => "not_jpeg",
            Awkward::TooLargeSide { .. } => "too_large_side",
        }
    }
}

impl std::fmt::Display for Awkward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Awkward::Grayscale => f.write_str("grayscale JPEG"),
            Awkward::Cmyk => f.write_str("CMYK/YCCK JPEG"),
            Awkward::Progressive => f.write_str("progressive JPEG"),
            Awkward::UnusualSubsampling(s) => write!(f, "unusual chroma subsampling {s}"),
            Awkward::UnusualColorSpace(s) => write!(f, "unusual colour space: {s}"),
            Awkward::NonBaseline(s) => write!(f, "non-baseline JPEG: {s}"),
            Awkward::NonInterleaved { scans } => {
                write!(f, "sequential JPEG in {scans} separate scans")
            }
            Awkward::NotJpeg(format) => write!(f, "{format} image, not JPEG"),
            Awkward::TooLargeSide {
                width,
                height,
                max_side,
            } => {
                write!(f, "{width}x{height} exceeds the maximum side {max_side}")
            }
        }
    }
}

/// Why a file cannot be stored at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Problem {
    Empty,
    Truncated,
    NotAnImage,
    TooManyPixels {
        width: u32,
        height: u32,
        limit: u64,
    },
    Corrupt(String),
    /// A recognised format or feature that no decoder here handles (e.g. arithmetic coding).
    Unsupported(String),
}

impl Problem {
    /// Stable machine-readable name, as in the JSON `kind` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::Empty => "empty",
            Problem::Truncated => "truncated",
            Problem::NotAnImage => "not_an_image",
            Problem::TooManyPixels { .. } => "too_many_pixels",
            Problem::Corrupt(_) => "corrupt",
            Problem::Unsupported(_) => "unsupported",
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Empty => f.write_str("empty file"),
            Problem::Truncated => f.write_str("truncated file"),
            Problem::NotAnImage => f.write_str("not an image"),
            Problem::TooManyPixels {
                width,
                height,
                limit,
            } => {
                let pixels = u64::from(*width) * u64::from(*height);
                write!(
                    f,
                    "{width}x{height} = {pixels} pixels exceeds the limit of {limit}"
                )
            }
            Problem::Corrupt(why) => write!(f, "corrupt: {why}"),
            Problem::Unsupported(what) => write!(f, "unsupported: {what}"),
        }
    }
}

/// The verdict on one input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Clean: store the input byte-identical.
    Kept { width: u32, height: u32 },
    /// Store `data`, a baseline RGB 4:2:0 JPEG.
    Reencoded {
        data: Vec<u8>,
        width: u32,
        height: u32,
        reason: Awkward,
    },
    /// Decodable but awkward, and the policy is [`AwkwardPolicy::Skip`].
    SkippedAwkward { reason: Awkward },
    /// Cannot be stored.
    Rejected(Problem),
}

impl Outcome {
    /// The bytes to store, given the input this outcome is for.
    pub fn stored_bytes<'a>(&'a self, input: &'a [u8]) -> Option<&'a [u8]> {
        match self {
            Outcome::Kept { .. } => Some(input),
            Outcome::Reencoded { data, .. } => Some(data),
            Outcome::SkippedAwkward { .. } | Outcome::Rejected(_) => None,
        }
    }
}

/// Decides what to store for one input file; see the module docs. Panic-free and
/// deterministic (same input and options, same output bytes).
pub fn sanitize(bytes: &[u8], opts: &SanitizeOptions) -> Outcome {
    let result = if bytes.is_empty() {
        Err(Problem::Empty)
    } else {
        match jpeg::parse_header(bytes) {
            Ok(info) => sanitize_jpeg(bytes, &info, opts),
            Err(HeaderError::NotJpeg) => sanitize_other(bytes, opts),
            Err(e) => Err(header_problem(&e)),
        }
    };
    result.unwrap_or_else(Outcome::Rejected)
}

/// The image check of `convnets verify --decode` ([`convnets_formats::verify::ImageCheck`]):
/// a stored record must be one [`sanitize`] keeps as it is. Returns its width and height.
pub fn check_stored(bytes: &[u8]) -> Result<(u32, u32), String> {
    // Skip: an awkward record is reported, not re-encoded for nothing.
    let opts = SanitizeOptions {
        awkward: AwkwardPolicy::Skip,
        ..SanitizeOptions::default()
    };
    match sanitize(bytes, &opts) {
        Outcome::Kept { width, height } => Ok((width, height)),
        Outcome::Reencoded { reason, .. } | Outcome::SkippedAwkward { reason } => {
            Err(format!("not a clean baseline JPEG: {reason}"))
        }
        Outcome::Rejected(problem) => Err(problem.to_string()),
    }
}

fn sanitize_jpeg(
    bytes: &[u8],
    info: &JpegInfo,
    opts: &SanitizeOptions,
) -> Result<Outcome, Problem> {
    check_pixels(info.width, info.height, opts)?;
    // A missing EOI means missing rows; salvaging would store a partly grey image.
    if !info.has_eoi {
        return Err(Problem::Truncated);
    }
    // Lenient decoders conceal corrupt entropy data, so check it strictly where we can.
    let huffman_dct = info.process.is_sequential_huffman() || info.process == Process::Progressive;
    if opts.verify_decode && huffman_dct && info.precision == 8 {
        strict_decode::decode_strict(bytes, info, opts.max_pixels).map_err(Problem::Corrupt)?;
    }
    if misdecoded_by_zune(info) {
        return Err(Problem::Unsupported(format!(
            "sequential JPEG in {} separate scans with vertical chroma subsampling, \
             which zune-jpeg 0.5.15 (the re-encoder's decoder) decodes wrongly without error",
            info.scans
        )));
    }
    let reason = jpeg_awkwardness(info).or_else(|| side_too_large(info.width, info.height, opts));
    match reason {
        Some(reason) => handle_awkward(bytes, ImageFormat::Jpeg, reason, opts),
        // Decoded in full above when verifying.
        None => Ok(Outcome::Kept {
            width: info.width,
            height: info.height,
        }),
    }
}

/// zune-jpeg 0.5.15 turns non-interleaved sequential scans into garbage when components
/// differ in vertical sampling (4:2:0, 4:4:0; zune-image issues 419, 422, 448), while
/// libjpeg decodes them. They are refused rather than re-encoded, because re-encoding
/// decodes through zune (`image`); whether every loader decoder (nvJPEG's hardware path
/// included) takes them as they are is untested. Progressive files are not affected.
fn misdecoded_by_zune(info: &JpegInfo) -> bool {
    let v_max = info.sampling.iter().map(|&(_, v)| v).max().unwrap_or(1);
    info.process.is_sequential_huffman()
        && info.scans > 1
        && info.sampling.iter().any(|&(_, v)| v != v_max)
}

/// Why this JPEG is not one every decoder takes, or `None` if it is clean. Colour space
/// comes first because its conversion is what a reader of the report most needs to know.
fn jpeg_awkwardness(info: &JpegInfo) -> Option<Awkward> {
    match jpeg::color_space(info) {
        ColorSpace::Gray => return Some(Awkward::Grayscale),
        ColorSpace::Cmyk | ColorSpace::Ycck => return Some(Awkward::Cmyk),
        ColorSpace::Rgb => {
            return Some(Awkward::UnusualColorSpace(
                "RGB-coded JPEG (no YCbCr transform)".into(),
            ))
        }
        ColorSpace::Other => {
            return Some(Awkward::UnusualColorSpace(format!(
                "{} components",
                info.components
            )));
        }
        ColorSpace::YCbCr => {}
    }
    match info.process {
        Process::Baseline | Process::ExtendedHuffman => {}
        Process::Progressive => return Some(Awkward::Progressive),
        other => return Some(Awkward::NonBaseline(other.to_string())),
    }
    if info.precision != 8 {
        return Some(Awkward::NonBaseline(format!(
            "{}-bit samples",
            info.precision
        )));
    }
    match jpeg::chroma_subsampling(info) {
        Subsampling::S444 | Subsampling::S422 | Subsampling::S420 | Subsampling::S440 => {}
        other => {
            let factors = info
                .sampling
                .iter()
                .map(|(h, v)| format!("{h}x{v}"))
                .collect::<Vec<_>>();
            return Some(Awkward::UnusualSubsampling(format!(
                "{other} ({})",
                factors.join(",")
            )));
        }
    }
    (info.scans != 1).then_some(Awkward::NonInterleaved { scans: info.scans })
}

/// Any format `image` recognises: check the header's size, then treat as awkward.
fn sanitize_other(bytes: &[u8], opts: &SanitizeOptions) -> Result<Outcome, Problem> {
    let format = image::guess_format(bytes).map_err(|_| Problem::NotAnImage)?;
    // PNG's size is at a fixed offset: refuse bombs before the decoder sizes its buffers.
    if let Some((width, height)) = png_dimensions(bytes) {
        check_pixels(width, height, opts)?;
    }
    let (width, height) = guarded(|| {
        reader(bytes, format, opts)
            .into_dimensions()
            .map_err(image_problem)
    })?;
    check_pixels(width, height, opts)?;
    handle_awkward(bytes, format, Awkward::NotJpeg(format_name(format)), opts)
}

fn handle_awkward(
    bytes: &[u8],
    format: ImageFormat,
    reason: Awkward,
    opts: &SanitizeOptions,
) -> Result<Outcome, Problem> {
    if opts.awkward == AwkwardPolicy::Skip {
        return Ok(Outcome::SkippedAwkward { reason });
    }
    if let Awkward::NonBaseline(what) = &reason {
        // zune-jpeg decodes 8-bit DCT Huffman JPEGs only; its error for the rest misleads.
        return Err(Problem::Unsupported(format!(
            "{what} JPEG: no decoder for it here"
        )));
    }
    let rgb = decode(bytes, format, opts)?.into_rgb8();
    let rgb = fit_side(rgb, opts.max_side);
    let data = guarded(|| encode_baseline(&rgb, opts.quality))?;
    Ok(Outcome::Reencoded {
        data,
        width: rgb.width(),
        height: rgb.height(),
        reason,
    })
}

/// `TooLargeSide` if the longer side exceeds `max_side`.
fn side_too_large(width: u32, height: u32, opts: &SanitizeOptions) -> Option<Awkward> {
    let max_side = opts.max_side?;
    resize_target(width, height, max_side).map(|_| Awkward::TooLargeSide {
        width,
        height,
        max_side,
    })
}

/// The size with the longer side scaled down to `max_side`, aspect kept; `None` if it fits.
fn resize_target(width: u32, height: u32, max_side: u32) -> Option<(u32, u32)> {
    let max_side = max_side.max(1);
    let long = width.max(height);
    if long <= max_side {
        return None;
    }
    // Rounded, never 0; at most max_side, so it fits in u32.
    let scale = |side: u32| {
        let scaled =
            (u64::from(side) * u64::from(max_side) + u64::from(long) / 2) / u64::from(long);
        u32::try_from(scaled.max(1)).unwrap_or(max_side)
    };
    Some(if width >= height {
        (max_side, scale(height))
    } else {
        (scale(width), max_side)
    })
}

fn fit_side(rgb: RgbImage, max_side: Option<u32>) -> RgbImage {
    match max_side.and_then(|max| resize_target(rgb.width(), rgb.height(), max)) {
        // Catmull-Rom with support widened by the scale factor: antialiased, like PIL's BICUBIC.
        Some((width, height)) => imageops::resize(&rgb, width, height, FilterType::CatmullRom),
        None => rgb,
    }
}

fn check_pixels(width: u32, height: u32, opts: &SanitizeOptions) -> Result<(), Problem> {
    if u64::from(width) * u64::from(height) > opts.max_pixels {
        return Err(Problem::TooManyPixels {
            width,
            height,
            limit: opts.max_pixels,
        });
    }
    Ok(())
}

/// Width and height from a PNG's IHDR chunk (CRC not checked: a bomb is refused either way).
fn png_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if !bytes.starts_with(SIGNATURE) || bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(bytes.get(16..20)?.try_into().ok()?);
    let height = u32::from_be_bytes(bytes.get(20..24)?.try_into().ok()?);
    Some((width, height))
}

/// Limits so no decoder allocates beyond what `max_pixels` pixels need.
fn decode_limits(opts: &SanitizeOptions) -> Limits {
    let side = u32::try_from(opts.max_pixels).unwrap_or(u32::MAX);
    let mut limits = Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(
        opts.max_pixels
            .saturating_mul(MAX_BYTES_PER_PIXEL)
            .saturating_add(DECODER_HEADROOM),
    );
    limits
}

fn reader<'a>(
    bytes: &'a [u8],
    format: ImageFormat,
    opts: &SanitizeOptions,
) -> ImageReader<Cursor<&'a [u8]>> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decode_limits(opts));
    reader
}

fn decode(
    bytes: &[u8],
    format: ImageFormat,
    opts: &SanitizeOptions,
) -> Result<DynamicImage, Problem> {
    guarded(|| reader(bytes, format, opts).decode().map_err(image_problem))
}

/// A baseline JPEG: JFIF, YCbCr 4:2:0 in one interleaved scan, standard Huffman tables.
fn encode_baseline(rgb: &RgbImage, quality: u8) -> Result<Vec<u8>, Problem> {
    let too_large = || {
        Problem::Unsupported(format!(
            "{}x{} exceeds JPEG's 65535 limit",
            rgb.width(),
            rgb.height()
        ))
    };
    let width = u16::try_from(rgb.width()).map_err(|_| too_large())?;
    let height = u16::try_from(rgb.height()).map_err(|_| too_large())?;
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100));
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    // Standard tables: jpeg-encoder 0.6 writes optimized tables as one scan per component,
    // which zune-jpeg 0.5.15 decodes to garbage (see `sanitize_jpeg`).
    encoder
        .encode(rgb.as_raw(), width, height, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| Problem::Corrupt(format!("re-encoding failed: {e}")))?;
    Ok(out)
}

/// Runs third-party decoding so that a bug there rejects one file instead of the whole run.
fn guarded<T>(f: impl FnOnce() -> Result<T, Problem>) -> Result<T, Problem> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(Problem::Corrupt("decoder panicked".into())))
}

fn header_problem(e: &HeaderError) -> Problem {
    match e {
        HeaderError::Empty => Problem::Empty,
        HeaderError::NotJpeg => Problem::NotAnImage,
        HeaderError::TruncatedHeader => Problem::Truncated,
        other => Problem::Corrupt(format!("JPEG header: {other}")),
    }
}

fn image_problem(e: ImageError) -> Problem {
    match e {
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Problem::Truncated
        }
        ImageError::Unsupported(u) => Problem::Unsupported(u.to_string()),
        ImageError::Limits(l) => Problem::Corrupt(format!("exceeds decoder limits: {l}")),
        other => Problem::Corrupt(other.to_string()),
    }
}

/// Lower-case format name for reports, e.g. "png".
fn format_name(format: ImageFormat) -> String {
    format!("{format:?}").to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GenericImageView, Rgb};
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
    use proptest::prelude::*;

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
        })
    }

    fn encode(
        data: &[u8],
        width: u16,
        height: u16,
        color: ColorType,
        setup: impl FnOnce(&mut Encoder<&mut Vec<u8>>),
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = Encoder::new(&mut out, 92);
        setup(&mut encoder);
        encoder
            .encode(data, width, height, color)
            .expect("encode fixture");
        out
    }

    fn rgb_jpeg(
        width: u16,
        height: u16,
        setup: impl FnOnce(&mut Encoder<&mut Vec<u8>>),
    ) -> Vec<u8> {
        let image = gradient(u32::from(width), u32::from(height));
        encode(image.as_raw(), width, height, ColorType::Rgb, setup)
    }

    fn baseline_420(width: u16, height: u16) -> Vec<u8> {
        rgb_jpeg(width, height, |e| {
            e.set_sampling_factor(SamplingFactor::R_4_2_0)
        })
    }

    fn encode_with(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encode fixture");
        out.into_inner()
    }

    fn run(bytes: &[u8]) -> Outcome {
        sanitize(bytes, &SanitizeOptions::default())
    }

    /// Re-encoded output must itself be clean: baseline YCbCr 4:2:0, and kept when fed back.
    fn assert_clean(data: &[u8], width: u32, height: u32) {
        let info = jpeg::parse_header(data).expect("re-encoded output parses");
        assert_eq!(info.process, Process::Baseline);
        assert_eq!((info.width, info.height), (width, height));
        assert_eq!(jpeg::chroma_subsampling(&info), Subsampling::S420);
        assert_eq!(jpeg::color_space(&info), ColorSpace::YCbCr);
        assert_eq!(run(data), Outcome::Kept { width, height });
    }

    fn expect_reencoded(outcome: Outcome) -> (Vec<u8>, u32, u32, Awkward) {
        match outcome {
            Outcome::Reencoded {
                data,
                width,
                height,
                reason,
            } => {
                assert_clean(&data, width, height);
                (data, width, height, reason)
            }
            other => panic!("expected Reencoded, got {other:?}"),
        }
    }

    fn decode_rgb(data: &[u8]) -> RgbImage {
        image::load_from_memory(data).expect("decode").to_rgb8()
    }

    fn close(a: Rgb<u8>, b: [u8; 3], tolerance: i32) -> bool {
        a.0.iter()
            .zip(b)
            .all(|(&x, y)| (i32::from(x) - i32::from(y)).abs() <= tolerance)
    }

    /// Rewrites the first SOF segment: marker, then `patch(body)`.
    fn patch_sof(jpeg: &[u8], marker: u8, patch: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut out = jpeg.to_vec();
        let mut pos = 2;
        while !(0xC0..=0xC3).contains(&out[pos + 1]) {
            pos += 2 + usize::from(u16::from_be_bytes([out[pos + 2], out[pos + 3]]));
        }
        out[pos + 1] = marker;
        patch(&mut out[pos + 4..]);
        out
    }

    #[test]
    fn clean_baseline_is_kept_byte_identical() {
        for factor in [
            SamplingFactor::R_4_2_0,
            SamplingFactor::R_4_4_4,
            SamplingFactor::R_4_2_2,
            SamplingFactor::R_4_4_0,
        ] {
            let jpeg = rgb_jpeg(48, 32, |e| e.set_sampling_factor(factor));
            let outcome = run(&jpeg);
            assert_eq!(
                outcome,
                Outcome::Kept {
                    width: 48,
                    height: 32
                },
                "{factor:?}"
            );
            assert_eq!(outcome.stored_bytes(&jpeg), Some(&jpeg[..]));
        }
        // SOF1 with 8-bit samples codes exactly like baseline.
        let sof1 = patch_sof(&baseline_420(48, 32), 0xC1, |_| {});
        assert_eq!(
            run(&sof1),
            Outcome::Kept {
                width: 48,
                height: 32
            }
        );
    }

    #[test]
    fn grayscale_becomes_rgb() {
        let gray = gradient(40, 24);
        let luma = DynamicImage::ImageRgb8(gray).into_luma8();
        let jpeg = encode(luma.as_raw(), 40, 24, ColorType::Luma, |_| {});
        let (data, width, height, reason) = expect_reencoded(run(&jpeg));
        assert_eq!((width, height, reason), (40, 24, Awkward::Grayscale));
        let out = decode_rgb(&data);
        assert!(
            out.pixels().all(|p| p
                .0
                .iter()
                .all(|&c| (i32::from(c) - i32::from(p.0[0])).abs() <= 6)),
            "gray stays gray"
        );
    }

    /// Four 16x16 patches of pure ink: red, green, blue, black.
    fn cmyk_patches() -> Vec<u8> {
        let inks: [[u8; 4]; 4] = [
            [0, 255, 255, 0],
            [255, 0, 255, 0],
            [255, 255, 0, 0],
            [0, 0, 0, 255],
        ];
        let mut data = Vec::new();
        for _y in 0..16 {
            for ink in inks {
                for _x in 0..16 {
                    data.extend_from_slice(&ink);
                }
            }
        }
        data
    }

    #[test]
    fn cmyk_and_ycck_come_out_in_the_right_colours() {
        for color in [ColorType::Cmyk, ColorType::CmykAsYcck] {
            let jpeg = encode(&cmyk_patches(), 64, 16, color, |e| {
                e.set_sampling_factor(SamplingFactor::R_4_4_4)
            });
            let info = jpeg::parse_header(&jpeg).expect("parse");
            assert_eq!(info.components, 4);
            let (data, width, height, reason) = expect_reencoded(run(&jpeg));
            assert_eq!(
                (width, height, reason),
                (64, 16, Awkward::Cmyk),
                "{color:?}"
            );
            let out = decode_rgb(&data);
            let want = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]];
            for (patch, rgb) in want.into_iter().enumerate() {
                let centre = out.get_pixel(patch as u32 * 16 + 8, 8);
                assert!(
                    close(*centre, rgb, 24),
                    "{color:?} patch {patch}: {centre:?} != {rgb:?}"
                );
            }
        }
    }

    #[test]
    fn progressive_is_reencoded() {
        let jpeg = rgb_jpeg(40, 30, |e| e.set_progressive(true));
        let (data, width, height, reason) = expect_reencoded(run(&jpeg));
        assert_eq!((width, height, reason), (40, 30, Awkward::Progressive));
        let (orig, out) = (gradient(40, 30), decode_rgb(&data));
        assert!(close(*out.get_pixel(20, 15), orig.get_pixel(20, 15).0, 16));
    }

    #[test]
    fn unusual_subsampling_and_colour_space_are_reencoded() {
        let jpeg = rgb_jpeg(48, 32, |e| e.set_sampling_factor(SamplingFactor::R_4_1_1));
        let (data, _, _, reason) = expect_reencoded(run(&jpeg));
        assert_eq!(
            reason,
            Awkward::UnusualSubsampling("4:1:1 (4x1,1x1,1x1)".into())
        );
        assert!(close(
            *decode_rgb(&data).get_pixel(24, 16),
            gradient(48, 32).get_pixel(24, 16).0,
            16
        ));
        // Adobe transform 0 on a 3-component file: decoders disagree between RGB and YCbCr.
        let rgb_coded = rgb_jpeg(32, 16, |e| {
            e.add_app_segment(14, b"Adobe\0\x64\0\0\0\0\0")
                .expect("app14")
        });
        let (_, _, _, reason) = expect_reencoded(run(&rgb_coded));
        assert!(
            matches!(reason, Awkward::UnusualColorSpace(_)),
            "{reason:?}"
        );
    }

    #[test]
    fn non_interleaved_scans() {
        // jpeg-encoder writes one scan per component when it optimizes Huffman tables.
        let per_component = |factor| {
            rgb_jpeg(40, 24, |e| {
                e.set_sampling_factor(factor);
                e.set_optimized_huffman_tables(true);
            })
        };
        let (data, width, height, reason) =
            expect_reencoded(run(&per_component(SamplingFactor::R_4_2_2)));
        assert_eq!(
            (width, height, reason),
            (40, 24, Awkward::NonInterleaved { scans: 3 })
        );
        assert!(close(
            *decode_rgb(&data).get_pixel(20, 12),
            gradient(40, 24).get_pixel(20, 12).0,
            16
        ));
        assert!(matches!(
            run(&per_component(SamplingFactor::R_4_2_0)),
            Outcome::Rejected(Problem::Unsupported(_))
        ));
    }

    #[test]
    fn non_baseline_processes() {
        let jpeg = baseline_420(32, 16);
        let skip = SanitizeOptions {
            awkward: AwkwardPolicy::Skip,
            ..Default::default()
        };
        let arithmetic = patch_sof(&jpeg, 0xC9, |_| {});
        let reason = Awkward::NonBaseline("arithmetic-coded (SOF9)".into());
        assert_eq!(
            sanitize(&arithmetic, &skip),
            Outcome::SkippedAwkward { reason }
        );
        // Huffman data read as arithmetic-coded cannot be decoded here.
        assert!(
            matches!(run(&arithmetic), Outcome::Rejected(_)),
            "{:?}",
            run(&arithmetic)
        );
        let lossless = patch_sof(&jpeg, 0xC3, |_| {});
        assert!(matches!(
            sanitize(&lossless, &skip),
            Outcome::SkippedAwkward {
                reason: Awkward::NonBaseline(_)
            }
        ));
        let twelve_bit = patch_sof(&jpeg, 0xC1, |body| body[0] = 12);
        let reason = Awkward::NonBaseline("12-bit samples".into());
        assert_eq!(
            sanitize(&twelve_bit, &skip),
            Outcome::SkippedAwkward { reason }
        );
    }

    #[test]
    fn other_formats_are_reencoded() {
        let image = DynamicImage::ImageRgb8(gradient(30, 20));
        for (format, name) in [
            (ImageFormat::Png, "png"),
            (ImageFormat::Bmp, "bmp"),
            (ImageFormat::Gif, "gif"),
        ] {
            let bytes = encode_with(&image, format);
            let (data, width, height, reason) = expect_reencoded(run(&bytes));
            assert_eq!(
                (width, height, reason),
                (30, 20, Awkward::NotJpeg(name.into()))
            );
            if format == ImageFormat::Png {
                assert!(close(
                    *decode_rgb(&data).get_pixel(15, 10),
                    image.get_pixel(15, 10).0[..3].try_into().expect("rgb"),
                    12
                ));
            }
        }
    }

    #[test]
    fn unusable_inputs_are_rejected() {
        assert_eq!(run(b""), Outcome::Rejected(Problem::Empty));
        assert_eq!(
            run(b"<html><body>404 Not Found</body></html>"),
            Outcome::Rejected(Problem::NotAnImage)
        );
        assert_eq!(
            run(&[0x00, 0x01, 0x02]),
            Outcome::Rejected(Problem::NotAnImage)
        );
        let jpeg = baseline_420(64, 48);
        assert_eq!(
            run(&jpeg[..jpeg.len() / 2]),
            Outcome::Rejected(Problem::Truncated)
        );
        assert_eq!(run(&jpeg[..40]), Outcome::Rejected(Problem::Truncated));
        let progressive = rgb_jpeg(64, 48, |e| e.set_progressive(true));
        assert_eq!(
            run(&progressive[..progressive.len() - 10]),
            Outcome::Rejected(Problem::Truncated)
        );
        let png = encode_with(&DynamicImage::ImageRgb8(gradient(64, 48)), ImageFormat::Png);
        assert!(matches!(
            run(&png[..png.len() / 2]),
            Outcome::Rejected(Problem::Truncated | Problem::Corrupt(_))
        ));
    }

    #[test]
    fn corrupt_entropy_data_is_rejected_when_verifying() {
        let jpeg = baseline_420(64, 64);
        // Not right after 0xFF, which would turn the overwrite into a marker.
        let mid = (jpeg.len() * 3 / 4..)
            .find(|&i| jpeg[i - 1] != 0xFF)
            .expect("offset");
        let mut corrupt = jpeg.clone();
        corrupt[mid..mid + 8].copy_from_slice(&[0xFE; 8]);
        assert!(
            matches!(run(&corrupt), Outcome::Rejected(Problem::Corrupt(_))),
            "{:?}",
            run(&corrupt)
        );
        let lenient = SanitizeOptions {
            verify_decode: false,
            ..Default::default()
        };
        assert_eq!(
            sanitize(&corrupt, &lenient),
            Outcome::Kept {
                width: 64,
                height: 64
            }
        );
    }

    #[test]
    fn bombs_are_refused_from_the_header() {
        let too_many = |width, height| {
            Outcome::Rejected(Problem::TooManyPixels {
                width,
                height,
                limit: DEFAULT_MAX_PIXELS,
            })
        };
        let jpeg = patch_sof(&baseline_420(16, 16), 0xC0, |body| {
            body[1..5].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60])
        });
        assert_eq!(run(&jpeg), too_many(60000, 60000));
        assert_eq!(run(&jpeg[..jpeg.len() / 2]), too_many(60000, 60000));
        let progressive = patch_sof(
            &rgb_jpeg(16, 16, |e| e.set_progressive(true)),
            0xC2,
            |body| body[1..5].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]),
        );
        assert_eq!(run(&progressive), too_many(60000, 60000));

        let mut png = encode_with(&DynamicImage::ImageRgb8(gradient(16, 16)), ImageFormat::Png);
        png[16..24].copy_from_slice(&[0, 0, 0xEA, 0x60, 0, 0, 0xEA, 0x60]);
        assert_eq!(run(&png), too_many(60000, 60000), "stale IHDR CRC");
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(run(&png), too_many(60000, 60000), "valid IHDR CRC");
        png[16..24].copy_from_slice(&[0x7F, 0xFF, 0xFF, 0xFF, 0, 0, 0, 1]);
        assert_eq!(run(&png), too_many(0x7FFF_FFFF, 1));
    }

    /// CRC-32 (ISO-HDLC) as PNG uses it, bit by bit.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn max_side_resizes_keeping_aspect() {
        let opts = |max| SanitizeOptions {
            max_side: Some(max),
            ..Default::default()
        };
        let landscape = baseline_420(200, 100);
        let (_, width, height, reason) = expect_reencoded(sanitize(&landscape, &opts(50)));
        assert_eq!((width, height), (50, 25));
        assert_eq!(
            reason,
            Awkward::TooLargeSide {
                width: 200,
                height: 100,
                max_side: 50
            }
        );
        let portrait = encode_with(
            &DynamicImage::ImageRgb8(gradient(90, 301)),
            ImageFormat::Png,
        );
        let (_, width, height, reason) = expect_reencoded(sanitize(&portrait, &opts(100)));
        assert_eq!(
            (width, height, reason),
            (30, 100, Awkward::NotJpeg("png".into()))
        );
        assert_eq!(
            sanitize(&landscape, &opts(200)),
            Outcome::Kept {
                width: 200,
                height: 100
            }
        );
        assert_eq!(resize_target(1000, 1, 10), Some((10, 1)));
        assert_eq!(resize_target(5, 5, 0), Some((1, 1)));
    }

    #[test]
    fn skip_policy_skips_awkward_only() {
        let skip = SanitizeOptions {
            awkward: AwkwardPolicy::Skip,
            ..Default::default()
        };
        let luma = vec![128u8; 16 * 16];
        let gray = encode(&luma, 16, 16, ColorType::Luma, |_| {});
        assert_eq!(
            sanitize(&gray, &skip),
            Outcome::SkippedAwkward {
                reason: Awkward::Grayscale
            }
        );
        let png = encode_with(&DynamicImage::ImageRgb8(gradient(8, 8)), ImageFormat::Png);
        assert_eq!(
            sanitize(&png, &skip),
            Outcome::SkippedAwkward {
                reason: Awkward::NotJpeg("png".into())
            }
        );
        assert_eq!(
            sanitize(&baseline_420(16, 16), &skip),
            Outcome::Kept {
                width: 16,
                height: 16
            }
        );
        assert_eq!(sanitize(b"", &skip), Outcome::Rejected(Problem::Empty));
    }

    #[test]
    fn reencoding_is_deterministic() {
        let jpeg = encode(&cmyk_patches(), 64, 16, ColorType::Cmyk, |_| {});
        let opts = SanitizeOptions {
            max_side: Some(40),
            ..Default::default()
        };
        assert_eq!(sanitize(&jpeg, &opts), sanitize(&jpeg, &opts));
    }

    #[test]
    fn reasons_serialize_for_the_report() {
        let problem = Problem::TooManyPixels {
            width: 60000,
            height: 60000,
            limit: DEFAULT_MAX_PIXELS,
        };
        let json = serde_json::to_value(&problem).expect("json");
        assert_eq!(json["kind"], problem.kind());
        assert_eq!(json["detail"]["width"], 60000);
        assert_eq!(
            problem.to_string(),
            "60000x60000 = 3600000000 pixels exceeds the limit of 89478485"
        );
        let awkward = Awkward::NotJpeg("png".into());
        assert_eq!(
            serde_json::to_string(&awkward).expect("json"),
            r#"{"kind":"not_jpeg","detail":"png"}"#
        );
        assert_eq!(awkward.to_string(), "png image, not JPEG");
        assert_eq!(
            serde_json::to_string(&Problem::Empty).expect("json"),
            r#"{"kind":"empty"}"#
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Truncated and mutated JPEGs never panic, and whatever is stored is clean.
        #[test]
        fn mutated_jpegs_never_panic(
            progressive in any::<bool>(),
            cut in prop_oneof![Just(1.0f64), 0.0f64..1.0],
            edits in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 0..6),
        ) {
            let mut bytes = rgb_jpeg(24, 16, |e| {
                e.set_sampling_factor(SamplingFactor::R_4_2_0);
                e.set_progressive(progressive);
            });
            for (at, value) in edits {
                let i = ((at * bytes.len() as f64) as usize).min(bytes.len() - 1);
                bytes[i] = value;
            }
            bytes.truncate((cut * bytes.len() as f64) as usize);
            let _ = jpeg::parse_header(&bytes);
            match sanitize(&bytes, &SanitizeOptions::default()) {
                Outcome::Kept { .. } => prop_assert!(jpeg::parse_header(&bytes).is_ok_and(|i| i.has_eoi)),
                Outcome::Reencoded { data, width, height, .. } => {
                    let info = jpeg::parse_header(&data);
                    prop_assert!(info.is_ok_and(|i| i.process == Process::Baseline && (i.width, i.height) == (width, height)));
                }
                Outcome::SkippedAwkward { .. } | Outcome::Rejected(_) => {}
            }
        }
    }
}
