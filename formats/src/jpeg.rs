//! Panic-free JPEG marker parsing (ITU T.81), enough to classify a file without decoding it.
//!
//! [`parse_header`] walks the marker structure: frame type, size, sampling factors, the Adobe
//! colour transform, and whether an EOI marker follows the last scan (skipping entropy-coded
//! data, so a progressive file's many scans are all crossed). It decodes nothing: the packer
//! (`convnets-pack`) checks the entropy-coded data with a strict libjpeg-turbo decode.
//!
//! Everything here indexes with `get` and checked arithmetic: input bytes are untrusted.

use std::fmt;

// Marker codes: the byte that follows 0xFF.
const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const APP0: u8 = 0xE0;
const APP14: u8 = 0xEE;
const RST0: u8 = 0xD0;

/// SOF0..SOF15, except the three codes in that range that are not frame headers
/// (DHT 0xC4, JPG 0xC8, DAC 0xCC).
fn is_sof(marker: u8) -> bool {
    (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)
}

fn is_rst(marker: u8) -> bool {
    (RST0..=RST0 + 7).contains(&marker)
}

/// The coding process, from the SOF marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// SOF0: baseline sequential DCT, Huffman.
    Baseline,
    /// SOF1: extended sequential DCT, Huffman (8 or 12 bits).
    ExtendedHuffman,
    /// SOF2: progressive DCT, Huffman.
    Progressive,
    /// SOF3: lossless, Huffman.
    Lossless,
    /// SOF5..SOF7: differential (hierarchical) Huffman; `sof` is the marker byte.
    Hierarchical { sof: u8 },
    /// SOF9..SOF11, SOF13..SOF15: arithmetic coding; `sof` is the marker byte.
    Arithmetic { sof: u8 },
}

impl Process {
    fn from_sof(marker: u8) -> Process {
        match marker {
            0xC0 => Process::Baseline,
            0xC1 => Process::ExtendedHuffman,
            0xC2 => Process::Progressive,
            0xC3 => Process::Lossless,
            0xC5..=0xC7 => Process::Hierarchical { sof: marker },
            _ => Process::Arithmetic { sof: marker },
        }
    }

    /// SOF0 or SOF1: one pass per component, Huffman-coded.
    pub fn is_sequential_huffman(self) -> bool {
        matches!(self, Process::Baseline | Process::ExtendedHuffman)
    }
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Process::Baseline => f.write_str("baseline (SOF0)"),
            Process::ExtendedHuffman => f.write_str("extended sequential (SOF1)"),
            Process::Progressive => f.write_str("progressive (SOF2)"),
            Process::Lossless => f.write_str("lossless (SOF3)"),
            Process::Hierarchical { sof } => {
                write!(f, "hierarchical (SOF{})", sof.wrapping_sub(0xC0))
            }
            Process::Arithmetic { sof } => {
                write!(f, "arithmetic-coded (SOF{})", sof.wrapping_sub(0xC0))
            }
        }
    }
}

/// What [`parse_header`] learns about a JPEG file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JpegInfo {
    pub width: u32,
    pub height: u32,
    pub components: u8,
    pub process: Process,
    /// Bits per sample: 8 for baseline, 12 (or 2..16 lossless) otherwise.
    pub precision: u8,
    /// (horizontal, vertical) sampling factor of each component, in frame order.
    pub sampling: Vec<(u8, u8)>,
    /// Component identifiers in frame order (1,2,3 usually; 'R','G','B' marks RGB).
    pub component_ids: Vec<u8>,
    /// Colour transform of an Adobe APP14 segment: 0 none (RGB/CMYK), 1 YCbCr, 2 YCCK.
    pub adobe_transform: Option<u8>,
    /// A JFIF APP0 segment is present (which implies YCbCr for 3 components).
    pub jfif: bool,
    /// Number of scans started (SOS markers): 1 for an interleaved sequential file, one per
    /// component for a non-interleaved one, several for progressive; 0 if cut before any.
    pub scans: u32,
    /// An EOI marker follows the last scan; `false` means the file is truncated.
    pub has_eoi: bool,
}

/// Why [`parse_header`] refused the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("empty input")]
    Empty,
    #[error("not a JPEG (no SOI marker)")]
    NotJpeg,
    #[error("data ends before the frame header")]
    TruncatedHeader,
    #[error("expected a marker at byte {offset}")]
    BadMarker { offset: usize },
    #[error("unexpected marker 0xFF{marker:02X} at byte {offset}")]
    UnexpectedMarker { marker: u8, offset: usize },
    #[error("segment 0xFF{marker:02X} at byte {offset} has invalid length {length}")]
    BadSegmentLength {
        marker: u8,
        offset: usize,
        length: u16,
    },
    #[error("malformed frame header: {0}")]
    BadFrame(&'static str),
    #[error("more than one frame header")]
    DuplicateFrame,
    #[error("scan or end of image before the frame header")]
    NoFrame,
    #[error("end of image before any scan")]
    NoScan,
    #[error("zero width or height in the frame header (DNL is not supported)")]
    ZeroDimension,
}

/// Chroma subsampling of a YCbCr (or other 3-component) frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsampling {
    /// One component.
    Gray,
    S444,
    S422,
    S420,
    S440,
    S411,
    S410,
    /// Anything else: chroma not at 1x1, unusual luma factors, 2 or 4+ components.
    Other,
}

impl fmt::Display for Subsampling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Subsampling::Gray => "gray",
            Subsampling::S444 => "4:4:4",
            Subsampling::S422 => "4:2:2",
            Subsampling::S420 => "4:2:0",
            Subsampling::S440 => "4:4:0",
            Subsampling::S411 => "4:1:1",
            Subsampling::S410 => "4:1:0",
            Subsampling::Other => "other",
        })
    }
}

/// Classifies the sampling factors. Only the canonical forms count: chroma must be 1x1, so
/// an equivalent-but-unusual 2x2,2x2,2x2 frame is [`Subsampling::Other`].
pub fn chroma_subsampling(info: &JpegInfo) -> Subsampling {
    match info.sampling.as_slice() {
        [_] => Subsampling::Gray,
        [luma, (1, 1), (1, 1)] => match luma {
            (1, 1) => Subsampling::S444,
            (2, 1) => Subsampling::S422,
            (2, 2) => Subsampling::S420,
            (1, 2) => Subsampling::S440,
            (4, 1) => Subsampling::S411,
            (4, 2) => Subsampling::S410,
            _ => Subsampling::Other,
        },
        _ => Subsampling::Other,
    }
}

/// The colour space a decoder should assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorSpace {
    Gray,
    YCbCr,
    /// Three components stored as RGB, without the YCbCr transform.
    Rgb,
    /// Four components; Adobe files store them inverted.
    Cmyk,
    /// Four components: YCbCr plus K (Adobe transform 2).
    Ycck,
    /// Two, or more than four, components.
    Other,
}

/// Follows libjpeg's rules (jdapimin.c), with one deviation: a 3-component file with Adobe
/// transform 0 is RGB even beside a JFIF segment, since decoders disagree on such files
/// (libjpeg says YCbCr, zune-jpeg says RGB) and they are then better re-encoded.
pub fn color_space(info: &JpegInfo) -> ColorSpace {
    match info.components {
        1 => ColorSpace::Gray,
        3 => match (info.adobe_transform, info.jfif) {
            (Some(0), _) => ColorSpace::Rgb,
            (Some(_), _) | (None, true) => ColorSpace::YCbCr,
            (None, false) if info.component_ids == b"RGB" => ColorSpace::Rgb,
            (None, false) => ColorSpace::YCbCr,
        },
        4 if info.adobe_transform == Some(2) => ColorSpace::Ycck,
        4 => ColorSpace::Cmyk,
        _ => ColorSpace::Other,
    }
}

/// Parses the marker structure of a JPEG file; see the module docs.
pub fn parse_header(bytes: &[u8]) -> Result<JpegInfo, HeaderError> {
    if bytes.is_empty() {
        return Err(HeaderError::Empty);
    }
    if !bytes.starts_with(&[0xFF, SOI]) {
        return Err(HeaderError::NotJpeg);
    }
    let mut walk = Markers::new(bytes);
    let mut frame: Option<Frame> = None;
    let (mut adobe_transform, mut jfif, mut scans) = (None, false, 0u32);
    let has_eoi = loop {
        let offset = walk.pos;
        match walk.next()? {
            Step::End => break false,
            Step::Marker(EOI) => break true,
            Step::Marker(SOI) => {
                return Err(HeaderError::UnexpectedMarker {
                    marker: SOI,
                    offset,
                })
            }
            // RSTn or TEM outside a scan: meaningless but harmless, as in libjpeg.
            Step::Marker(_) => {}
            Step::Segment(SOS, _) => {
                if frame.is_none() {
                    return Err(HeaderError::NoFrame);
                }
                scans += 1;
                if !walk.skip_entropy_coded_data() {
                    break false;
                }
            }
            Step::Segment(marker, body) if is_sof(marker) => {
                if frame.is_some() {
                    return Err(HeaderError::DuplicateFrame);
                }
                frame = Some(Frame::parse(marker, body)?);
            }
            Step::Segment(APP0, body) => jfif |= body.starts_with(b"JFIF\0"),
            Step::Segment(APP14, body) => {
                if body.starts_with(b"Adobe") {
                    adobe_transform = body.get(11).copied().or(adobe_transform);
                }
            }
            Step::Segment(..) => {}
        }
    };
    let Some(frame) = frame else {
        return Err(if has_eoi {
            HeaderError::NoFrame
        } else {
            HeaderError::TruncatedHeader
        });
    };
    // A file cut after the frame header is Ok with has_eoi false: its size is still
    // reported, so a truncated bomb is named as such.
    if scans == 0 && has_eoi {
        return Err(HeaderError::NoScan);
    }
    Ok(JpegInfo {
        width: u32::from(frame.width),
        height: u32::from(frame.height),
        components: frame.components.len() as u8, // at most 255: the count is one byte
        process: frame.process,
        precision: frame.precision,
        sampling: frame.components.iter().map(|c| (c.h, c.v)).collect(),
        component_ids: frame.components.iter().map(|c| c.id).collect(),
        adobe_transform,
        jfif,
        scans,
        has_eoi,
    })
}

/// One step of the marker walk.
enum Step<'a> {
    /// A marker without payload (RSTn, TEM, SOI, EOI).
    Marker(u8),
    /// A marker segment and its payload (after the length field).
    Segment(u8, &'a [u8]),
    /// The data ran out, possibly in the middle of a segment.
    End,
}

/// Cursor over the markers of a JPEG file, starting after SOI.
struct Markers<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Markers<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Markers { bytes, pos: 2 }
    }

    fn byte(&self, at: usize) -> Option<u8> {
        self.bytes.get(at).copied()
    }

    /// Reads the marker at `pos` (fill bytes 0xFF allowed before the code) and its segment.
    fn next(&mut self) -> Result<Step<'a>, HeaderError> {
        let offset = self.pos;
        match self.byte(self.pos) {
            None => return Ok(Step::End),
            Some(0xFF) => {}
            Some(_) => return Err(HeaderError::BadMarker { offset }),
        }
        while self.byte(self.pos) == Some(0xFF) {
            self.pos += 1;
        }
        let Some(marker) = self.byte(self.pos) else {
            return Ok(Step::End);
        };
        self.pos += 1;
        if marker == 0x00 {
            return Err(HeaderError::BadMarker { offset });
        }
        if matches!(marker, SOI | EOI | 0x01) || is_rst(marker) {
            return Ok(Step::Marker(marker));
        }
        let (Some(hi), Some(lo)) = (self.byte(self.pos), self.byte(self.pos + 1)) else {
            return Ok(Step::End);
        };
        let length = u16::from_be_bytes([hi, lo]);
        if length < 2 {
            return Err(HeaderError::BadSegmentLength {
                marker,
                offset,
                length,
            });
        }
        let start = self.pos + 2;
        let end = self.pos + usize::from(length);
        let Some(body) = self.bytes.get(start..end) else {
            self.pos = self.bytes.len();
            return Ok(Step::End);
        };
        self.pos = end;
        Ok(Step::Segment(marker, body))
    }

    /// Moves `pos` past entropy-coded data to the next real marker. Stuffed 0xFF00 and RSTn
    /// belong to the data; 0xFF 0xFF is a fill byte before a marker. False if the data ends.
    fn skip_entropy_coded_data(&mut self) -> bool {
        loop {
            let Some(ff) = self
                .bytes
                .get(self.pos..)
                .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
            else {
                self.pos = self.bytes.len();
                return false;
            };
            self.pos += ff;
            match self.byte(self.pos + 1) {
                None => return false,
                Some(0x00) => self.pos += 2,
                Some(code) if is_rst(code) => self.pos += 2,
                Some(0xFF) => self.pos += 1,
                Some(_) => return true,
            }
        }
    }
}

struct FrameComponent {
    id: u8,
    h: u8,
    v: u8,
}

/// A parsed SOF segment.
struct Frame {
    process: Process,
    precision: u8,
    width: u16,
    height: u16,
    components: Vec<FrameComponent>,
}

impl Frame {
    fn parse(marker: u8, body: &[u8]) -> Result<Frame, HeaderError> {
        let [precision, h1, h0, w1, w0, count, rest @ ..] = body else {
            return Err(HeaderError::BadFrame("segment too short"));
        };
        if *count == 0 {
            return Err(HeaderError::BadFrame("no components"));
        }
        if rest.len() != 3 * usize::from(*count) {
            return Err(HeaderError::BadFrame(
                "length does not match the component count",
            ));
        }
        let components = rest
            .chunks_exact(3)
            .map(|c| FrameComponent {
                id: c[0],
                h: c[1] >> 4,
                v: c[1] & 0x0F,
            })
            .collect::<Vec<_>>();
        if components
            .iter()
            .any(|c| !(1..=4).contains(&c.h) || !(1..=4).contains(&c.v))
        {
            return Err(HeaderError::BadFrame("sampling factor outside 1..4"));
        }
        let (width, height) = (
            u16::from_be_bytes([*w1, *w0]),
            u16::from_be_bytes([*h1, *h0]),
        );
        if width == 0 || height == 0 {
            return Err(HeaderError::ZeroDimension);
        }
        Ok(Frame {
            process: Process::from_sof(marker),
            precision: *precision,
            width,
            height,
            components,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};

    /// A smooth colour gradient, so every block has AC coefficients.
    fn gradient(width: u16, height: u16) -> Vec<u8> {
        let mut data = Vec::with_capacity(usize::from(width) * usize::from(height) * 3);
        for y in 0..height {
            for x in 0..width {
                data.extend_from_slice(&[(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]);
            }
        }
        data
    }

    fn encode(width: u16, height: u16, setup: impl FnOnce(&mut Encoder<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = Encoder::new(&mut out, 90);
        setup(&mut encoder);
        encoder
            .encode(&gradient(width, height), width, height, ColorType::Rgb)
            .expect("encode");
        out
    }

    #[test]
    fn baseline_header() {
        let jpeg = encode(37, 21, |e| e.set_sampling_factor(SamplingFactor::R_4_2_0));
        let info = parse_header(&jpeg).expect("parse");
        assert_eq!(
            (info.width, info.height, info.components, info.precision),
            (37, 21, 3, 8)
        );
        assert_eq!(info.process, Process::Baseline);
        assert_eq!(info.sampling, vec![(2, 2), (1, 1), (1, 1)]);
        assert_eq!(chroma_subsampling(&info), Subsampling::S420);
        assert_eq!(color_space(&info), ColorSpace::YCbCr);
        assert!(info.jfif && info.has_eoi && info.adobe_transform.is_none());
        assert_eq!(info.scans, 1);
    }

    #[test]
    fn subsampling_classes() {
        for (factor, want) in [
            (SamplingFactor::R_4_4_4, Subsampling::S444),
            (SamplingFactor::R_4_2_2, Subsampling::S422),
            (SamplingFactor::R_4_4_0, Subsampling::S440),
            (SamplingFactor::R_4_1_1, Subsampling::S411),
            (SamplingFactor::R_4_1_0, Subsampling::S410),
            (SamplingFactor::R_4_2_1, Subsampling::Other),
        ] {
            let jpeg = encode(40, 24, |e| e.set_sampling_factor(factor));
            let info = parse_header(&jpeg).expect("parse");
            assert_eq!(chroma_subsampling(&info), want, "{factor:?}");
        }
    }

    #[test]
    fn progressive_crosses_all_scans() {
        let jpeg = encode(33, 17, |e| e.set_progressive(true));
        let info = parse_header(&jpeg).expect("parse");
        assert_eq!(info.process, Process::Progressive);
        assert!(info.scans > 1 && info.has_eoi);
        // Cut inside the later scans: the header is fine but EOI is missing.
        let cut = &jpeg[..jpeg.len() - 40];
        assert!(!parse_header(cut).expect("parse").has_eoi);
    }

    #[test]
    fn restart_markers_and_component_scans() {
        let restarts = encode(64, 40, |e| {
            e.set_sampling_factor(SamplingFactor::R_4_2_0);
            e.set_restart_interval(3);
        });
        assert!(parse_header(&restarts).expect("parse").has_eoi);
        // Optimized tables make jpeg-encoder write one scan per component.
        let per_component = encode(64, 40, |e| {
            e.set_sampling_factor(SamplingFactor::R_4_2_0);
            e.set_optimized_huffman_tables(true);
        });
        assert_eq!(parse_header(&per_component).expect("parse").scans, 3);
    }

    #[test]
    fn grayscale_and_trailing_garbage() {
        let mut out = Vec::new();
        let gray = vec![100u8; 24 * 24];
        Encoder::new(&mut out, 80)
            .encode(&gray, 24, 24, ColorType::Luma)
            .expect("encode");
        out.extend_from_slice(b"trailing garbage \xFF\xD8");
        let info = parse_header(&out).expect("parse");
        assert_eq!(
            (info.components, chroma_subsampling(&info)),
            (1, Subsampling::Gray)
        );
        assert_eq!(color_space(&info), ColorSpace::Gray);
        assert!(info.has_eoi);
    }

    #[test]
    fn header_errors() {
        let jpeg = encode(16, 16, |_| {});
        assert_eq!(parse_header(&[]), Err(HeaderError::Empty));
        assert_eq!(parse_header(b"GIF89a"), Err(HeaderError::NotJpeg));
        assert_eq!(parse_header(&jpeg[..30]), Err(HeaderError::TruncatedHeader));
        assert_eq!(
            parse_header(&[0xFF, 0xD8, 0xFF, 0xD9]),
            Err(HeaderError::NoFrame)
        );
        assert!(matches!(
            parse_header(&[0xFF, 0xD8, 0x12]),
            Err(HeaderError::BadMarker { offset: 2 })
        ));
        assert!(matches!(
            parse_header(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01]),
            Err(HeaderError::BadSegmentLength { length: 1, .. })
        ));
        let mut zero = jpeg.clone();
        let sof = find_marker(&zero, 0xC0);
        zero[sof + 5..sof + 9].fill(0);
        assert_eq!(parse_header(&zero), Err(HeaderError::ZeroDimension));
        let mut no_scan = jpeg[..find_marker(&jpeg, SOS)].to_vec();
        no_scan.extend_from_slice(&[0xFF, EOI]);
        assert_eq!(parse_header(&no_scan), Err(HeaderError::NoScan));
    }

    /// Offset of the first `0xFF marker` at segment level.
    fn find_marker(jpeg: &[u8], marker: u8) -> usize {
        let mut pos = 2;
        while jpeg[pos + 1] != marker {
            pos += 2 + usize::from(u16::from_be_bytes([jpeg[pos + 2], jpeg[pos + 3]]));
        }
        pos
    }
}
