//! Panic-free JPEG marker parsing (ITU T.81), enough to classify a file without decoding it.
//!
//! [`parse_header`] walks the marker structure: frame type, size, sampling factors, the Adobe
//! colour transform, and whether an EOI marker follows the last scan (skipping entropy-coded
//! data, so a progressive file's many scans are all crossed). [`verify_scans`] goes further
//! for sequential Huffman files and decodes the Huffman codes of every block strictly: the
//! `image` crate runs zune-jpeg in lenient mode, which conceals corrupt data instead of failing.
//!
//! Everything here indexes with `get` and checked arithmetic: input bytes are untrusted.

use std::fmt;

// Marker codes: the byte that follows 0xFF.
const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const DQT: u8 = 0xDB;
const DHT: u8 = 0xC4;
const DRI: u8 = 0xDD;
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

    /// SOF0 or SOF1: one pass per component, Huffman-coded (what [`verify_scans`] checks).
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
    quant_table: u8,
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
                quant_table: c[2],
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

    fn max_sampling(&self) -> (u8, u8) {
        let h = self.components.iter().map(|c| c.h).max().unwrap_or(1);
        let v = self.components.iter().map(|c| c.v).max().unwrap_or(1);
        (h, v)
    }
}

/// Corrupt entropy-coded data found by [`verify_scans`], or a structure it cannot check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} (byte {offset})")]
pub struct ScanError {
    pub offset: usize,
    pub what: String,
}

fn scan_error(offset: usize, what: impl Into<String>) -> ScanError {
    ScanError {
        offset,
        what: what.into(),
    }
}

/// Strictly checks every scan of a sequential Huffman JPEG (SOF0/SOF1): tables defined and
/// well formed, every block's Huffman codes valid with at most 64 coefficients, restart
/// markers in sequence, no data missing or left over at the end of a scan, every component
/// scanned, and an EOI. libjpeg reports these cases as "Corrupt JPEG data" warnings and
/// zune-jpeg (lenient) conceals them; strict decoders such as nvJPEG may fail.
/// Does not run the IDCT; cost is a Huffman decode of the file.
pub fn verify_scans(bytes: &[u8]) -> Result<(), ScanError> {
    if !bytes.starts_with(&[0xFF, SOI]) {
        return Err(scan_error(0, "not a JPEG"));
    }
    let mut walk = Markers::new(bytes);
    let mut frame: Option<Frame> = None;
    let mut tables = Tables::default();
    let mut restart_interval = 0u16;
    let mut scanned = Vec::new();
    loop {
        let offset = walk.pos;
        let step = walk.next().map_err(|e| scan_error(offset, e.to_string()))?;
        match step {
            Step::End => {
                return Err(scan_error(
                    bytes.len(),
                    "data ends before the end-of-image marker",
                ))
            }
            Step::Marker(EOI) => break,
            Step::Marker(_) => {}
            Step::Segment(marker, body) if is_sof(marker) => {
                if frame.is_some() {
                    return Err(scan_error(offset, "more than one frame header"));
                }
                let f =
                    Frame::parse(marker, body).map_err(|e| scan_error(offset, e.to_string()))?;
                if !f.process.is_sequential_huffman() {
                    return Err(scan_error(
                        offset,
                        format!("cannot verify a {} frame", f.process),
                    ));
                }
                scanned = vec![false; f.components.len()];
                frame = Some(f);
            }
            Step::Segment(DHT, body) => tables
                .define_huffman(body)
                .map_err(|e| scan_error(offset, e))?,
            Step::Segment(DQT, body) => tables
                .define_quant(body)
                .map_err(|e| scan_error(offset, e))?,
            Step::Segment(DRI, body) => match body {
                [hi, lo] => restart_interval = u16::from_be_bytes([*hi, *lo]),
                _ => return Err(scan_error(offset, "DRI segment of wrong length")),
            },
            Step::Segment(SOS, body) => {
                let frame = frame
                    .as_ref()
                    .ok_or_else(|| scan_error(offset, "scan before the frame header"))?;
                let scan = Scan::parse(body, frame, &tables).map_err(|e| scan_error(offset, e))?;
                for unit in &scan.units {
                    match scanned.get_mut(unit.component) {
                        Some(seen) if !*seen => *seen = true,
                        _ => return Err(scan_error(offset, "a component is scanned twice")),
                    }
                }
                walk.pos = decode_scan(bytes, walk.pos, frame, &scan, &tables, restart_interval)?;
            }
            Step::Segment(..) => {}
        }
    }
    if frame.is_none() {
        return Err(scan_error(0, "no frame header"));
    }
    if scanned.iter().any(|seen| !seen) {
        return Err(scan_error(bytes.len(), "a component is never scanned"));
    }
    Ok(())
}

/// A Huffman table in the form of T.81 Annex F.2.2.3 (decoding by code length).
#[derive(Clone)]
struct Huffman {
    /// Largest code of each length 1..=16, or -1 if none.
    max_code: [i32; 17],
    /// Added to a code of that length to index `values`.
    offset: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    /// Builds canonical codes from the 16 length counts. Rejects over-full tables, and (as
    /// libjpeg does) tables that would use an all-ones code.
    fn build(counts: &[u8], values: &[u8]) -> Result<Huffman, &'static str> {
        let mut table = Huffman {
            max_code: [-1; 17],
            offset: [0; 17],
            values: values.to_vec(),
        };
        let (mut code, mut index) = (0i32, 0i32);
        for (len, &count) in (1..=16).zip(counts) {
            let count = i32::from(count);
            if count > 0 {
                table.offset[len] = index - code;
                index += count;
                code += count;
                if code >= 1 << len {
                    return Err("invalid Huffman table (too many codes)");
                }
                table.max_code[len] = code - 1;
            }
            code <<= 1;
        }
        Ok(table)
    }

    fn decode(&self, bits: &mut Bits<'_>) -> Result<u8, ScanError> {
        let mut code = 0i32;
        for len in 1..=16 {
            code = (code << 1) | bits.bit()?;
            if code <= self.max_code[len] {
                let index = usize::try_from(code + self.offset[len]).ok();
                return index
                    .and_then(|i| self.values.get(i).copied())
                    .ok_or_else(|| scan_error(bits.pos, "invalid Huffman code"));
            }
        }
        Err(scan_error(bits.pos, "invalid Huffman code"))
    }
}

/// Tables defined so far; DHT and DQT may also appear between scans.
#[derive(Default)]
struct Tables {
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
    quant: [bool; 4],
}

impl Tables {
    fn define_huffman(&mut self, mut body: &[u8]) -> Result<(), &'static str> {
        while let [class_id, rest @ ..] = body {
            let (class, id) = (class_id >> 4, usize::from(class_id & 0x0F));
            let counts = rest.get(..16).ok_or("DHT segment too short")?;
            let total = counts.iter().map(|&c| usize::from(c)).sum::<usize>();
            if total > 256 {
                return Err("invalid Huffman table (more than 256 symbols)");
            }
            let values = rest.get(16..16 + total).ok_or("DHT segment too short")?;
            let table = Some(Huffman::build(counts, values)?);
            match (class, id) {
                (0, 0..=3) => self.dc[id] = table,
                (1, 0..=3) => self.ac[id] = table,
                _ => return Err("invalid Huffman table class or id"),
            }
            body = rest.get(16 + total..).unwrap_or_default();
        }
        Ok(())
    }

    fn define_quant(&mut self, mut body: &[u8]) -> Result<(), &'static str> {
        while let [precision_id, rest @ ..] = body {
            let size = match precision_id >> 4 {
                0 => 64,
                1 => 128,
                _ => return Err("invalid quantization table precision"),
            };
            let id = usize::from(precision_id & 0x0F);
            *self
                .quant
                .get_mut(id)
                .ok_or("invalid quantization table id")? = true;
            body = rest.get(size..).ok_or("DQT segment too short")?;
        }
        Ok(())
    }
}

/// One component's part in a scan.
struct ScanUnit {
    /// Index into the frame's components.
    component: usize,
    dc: usize,
    ac: usize,
    /// Blocks per MCU: h*v when interleaved, 1 otherwise.
    blocks: u32,
}

struct Scan {
    units: Vec<ScanUnit>,
    mcus_x: u64,
    mcus_y: u64,
}

impl Scan {
    fn parse(body: &[u8], frame: &Frame, tables: &Tables) -> Result<Scan, &'static str> {
        let [count, rest @ ..] = body else {
            return Err("SOS segment too short");
        };
        let count = usize::from(*count);
        if !(1..=4).contains(&count) || rest.len() != 2 * count + 3 {
            return Err("SOS segment of wrong length");
        }
        let (selectors, spectral) = rest.split_at(2 * count);
        if spectral != [0, 63, 0] {
            return Err("not a sequential scan (spectral selection or approximation set)");
        }
        let interleaved = count > 1;
        let mut units = Vec::with_capacity(count);
        for pair in selectors.chunks_exact(2) {
            let component = frame
                .components
                .iter()
                .position(|c| c.id == pair[0])
                .ok_or("scan names an unknown component")?;
            if units.iter().any(|u: &ScanUnit| u.component == component) {
                return Err("scan names a component twice");
            }
            let c = &frame.components[component];
            let (dc, ac) = (usize::from(pair[1] >> 4), usize::from(pair[1] & 0x0F));
            if tables.dc.get(dc).and_then(Option::as_ref).is_none()
                || tables.ac.get(ac).and_then(Option::as_ref).is_none()
            {
                return Err("scan uses an undefined Huffman table");
            }
            if !tables
                .quant
                .get(usize::from(c.quant_table))
                .copied()
                .unwrap_or(false)
            {
                return Err("scan uses an undefined quantization table");
            }
            let blocks = if interleaved {
                u32::from(c.h) * u32::from(c.v)
            } else {
                1
            };
            units.push(ScanUnit {
                component,
                dc,
                ac,
                blocks,
            });
        }
        if units.iter().map(|u| u.blocks).sum::<u32>() > 10 {
            return Err("more than 10 blocks per MCU");
        }
        let (hmax, vmax) = frame.max_sampling();
        let (width, height) = (u64::from(frame.width), u64::from(frame.height));
        let (mcus_x, mcus_y) = match (interleaved, units.first()) {
            (false, Some(unit)) => {
                // A lone component is coded block by block over its own (subsampled) size.
                let c = &frame.components[unit.component];
                let w = (width * u64::from(c.h)).div_ceil(u64::from(hmax));
                let h = (height * u64::from(c.v)).div_ceil(u64::from(vmax));
                (w.div_ceil(8), h.div_ceil(8))
            }
            _ => (
                width.div_ceil(8 * u64::from(hmax)),
                height.div_ceil(8 * u64::from(vmax)),
            ),
        };
        Ok(Scan {
            units,
            mcus_x,
            mcus_y,
        })
    }
}

/// Huffman-decodes one scan starting at `start`; returns the offset of the marker after it.
fn decode_scan(
    bytes: &[u8],
    start: usize,
    frame: &Frame,
    scan: &Scan,
    tables: &Tables,
    restart_interval: u16,
) -> Result<usize, ScanError> {
    let max_dc_category = if frame.precision > 8 { 15 } else { 11 };
    let mut bits = Bits {
        data: bytes,
        pos: start,
        acc: 0,
        count: 0,
    };
    let mut next_rst = 0u8;
    let total = scan.mcus_x * scan.mcus_y;
    for mcu in 0..total {
        if restart_interval > 0 && mcu > 0 && mcu % u64::from(restart_interval) == 0 {
            bits.restart(next_rst)?;
            next_rst = (next_rst + 1) & 7;
        }
        for unit in &scan.units {
            // Scan::parse checked that both tables exist.
            let (Some(Some(dc)), Some(Some(ac))) = (tables.dc.get(unit.dc), tables.ac.get(unit.ac))
            else {
                return Err(scan_error(bits.pos, "scan uses an undefined Huffman table"));
            };
            for _ in 0..unit.blocks {
                decode_block(&mut bits, dc, ac, max_dc_category)?;
            }
        }
    }
    bits.finish()
}

/// Skips one 8x8 block: a DC difference, then AC run/size codes up to EOB or 63.
fn decode_block(
    bits: &mut Bits<'_>,
    dc: &Huffman,
    ac: &Huffman,
    max_dc_category: u8,
) -> Result<(), ScanError> {
    let category = dc.decode(bits)?;
    if category > max_dc_category {
        return Err(scan_error(bits.pos, "DC difference out of range"));
    }
    bits.skip(category)?;
    let mut k = 1u32;
    while k < 64 {
        let symbol = ac.decode(bits)?;
        let (run, size) = (u32::from(symbol >> 4), symbol & 0x0F);
        if size == 0 {
            if run != 15 {
                break; // end of block
            }
            k += 16; // ZRL: sixteen zeros
            continue;
        }
        k += run;
        if k > 63 {
            return Err(scan_error(bits.pos, "AC coefficient index past 63"));
        }
        bits.skip(size)?;
        k += 1;
    }
    if k > 64 {
        return Err(scan_error(bits.pos, "AC coefficient index past 63"));
    }
    Ok(())
}

/// MSB-first bit reader over entropy-coded data. It reads a byte only when a bit is needed,
/// so reaching the next marker is an error only if the data really needed more bits.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: i32,
    count: u32,
}

impl Bits<'_> {
    fn bit(&mut self) -> Result<i32, ScanError> {
        if self.count == 0 {
            self.acc = i32::from(self.next_byte()?);
            self.count = 8;
        }
        self.count -= 1;
        Ok((self.acc >> self.count) & 1)
    }

    fn skip(&mut self, n: u8) -> Result<(), ScanError> {
        for _ in 0..n {
            self.bit()?;
        }
        Ok(())
    }

    fn next_byte(&mut self) -> Result<u8, ScanError> {
        match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
            (None, _) => Err(scan_error(self.pos, "data ends inside a scan")),
            (Some(0xFF), Some(0x00)) => {
                self.pos += 2;
                Ok(0xFF)
            }
            (Some(0xFF), _) => Err(scan_error(
                self.pos,
                "premature end of scan data (marker reached)",
            )),
            (Some(&b), _) => {
                self.pos += 1;
                Ok(b)
            }
        }
    }

    /// Drops the padding bits and expects RSTn (after optional fill bytes).
    fn restart(&mut self, n: u8) -> Result<(), ScanError> {
        self.count = 0;
        while self.data.get(self.pos) == Some(&0xFF) && self.data.get(self.pos + 1) == Some(&0xFF) {
            self.pos += 1;
        }
        if self.data.get(self.pos) == Some(&0xFF)
            && self.data.get(self.pos + 1) == Some(&(RST0 + n))
        {
            self.pos += 2;
            Ok(())
        } else {
            Err(scan_error(
                self.pos,
                format!("expected restart marker RST{n}"),
            ))
        }
    }

    /// Drops the padding bits; the next bytes must be a marker, not left-over data.
    fn finish(mut self) -> Result<usize, ScanError> {
        self.count = 0;
        match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
            (Some(0xFF), Some(&code)) if code != 0x00 => Ok(self.pos),
            (None, _) | (Some(0xFF), None) => Err(scan_error(self.pos, "data ends after a scan")),
            // Bytes between the last block and the next marker: libjpeg only warns
            // ("extraneous bytes") and decodes the image in full, so accept them.
            _ => self.data[self.pos..]
                .windows(2)
                .position(|w| w[0] == 0xFF && w[1] != 0x00 && !(0xD0..=0xD7).contains(&w[1]))
                .map(|i| self.pos + i)
                .ok_or_else(|| scan_error(self.pos, "data ends after a scan")),
        }
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
        verify_scans(&jpeg).expect("valid scans");
    }

    #[test]
    fn extraneous_bytes_before_eoi_are_accepted() {
        // libjpeg decodes such files in full with only a warning; so do we.
        let mut jpeg = encode(37, 21, |e| e.set_sampling_factor(SamplingFactor::R_4_2_0));
        let eoi = jpeg.len() - 2;
        jpeg.splice(eoi..eoi, [0x12, 0x34, 0x56]);
        verify_scans(&jpeg).expect("extraneous bytes are not corruption");
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
            verify_scans(&jpeg).unwrap_or_else(|e| panic!("{factor:?}: {e}"));
        }
    }

    #[test]
    fn progressive_crosses_all_scans() {
        let jpeg = encode(33, 17, |e| e.set_progressive(true));
        let info = parse_header(&jpeg).expect("parse");
        assert_eq!(info.process, Process::Progressive);
        assert!(info.scans > 1 && info.has_eoi);
        assert!(
            verify_scans(&jpeg).is_err(),
            "progressive frames are not verified"
        );
        // Cut inside the later scans: the header is fine but EOI is missing.
        let cut = &jpeg[..jpeg.len() - 40];
        assert!(!parse_header(cut).expect("parse").has_eoi);
    }

    #[test]
    fn restart_markers_and_component_scans_verify() {
        let restarts = encode(64, 40, |e| {
            e.set_sampling_factor(SamplingFactor::R_4_2_0);
            e.set_restart_interval(3);
        });
        assert!(parse_header(&restarts).expect("parse").has_eoi);
        verify_scans(&restarts).expect("valid scans");
        // Optimized tables make jpeg-encoder write one scan per component.
        let per_component = encode(64, 40, |e| {
            e.set_sampling_factor(SamplingFactor::R_4_2_0);
            e.set_optimized_huffman_tables(true);
        });
        assert_eq!(parse_header(&per_component).expect("parse").scans, 3);
        verify_scans(&per_component).expect("valid scans");
        let mut wrong_rst = restarts.clone();
        let rst = wrong_rst
            .windows(2)
            .position(|w| w == [0xFF, RST0])
            .expect("RST0");
        wrong_rst[rst + 1] = RST0 + 1;
        assert!(verify_scans(&wrong_rst).is_err());
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
        verify_scans(&out).expect("valid scans");
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

    #[test]
    fn corrupt_scan_data_is_found() {
        let jpeg = encode(64, 64, |_| {});
        let sos = find_marker(&jpeg, SOS);
        let data_start = sos + 2 + usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
        let mid = (data_start + jpeg.len()) / 2;
        let mut corrupt = jpeg.clone();
        corrupt[mid..mid + 8].copy_from_slice(&[0xFE; 8]);
        assert!(verify_scans(&corrupt).is_err());
        // Data missing in the middle: the scan runs into EOI.
        let mut short = jpeg[..mid].to_vec();
        short.extend_from_slice(&[0xFF, EOI]);
        assert!(parse_header(&short).expect("parse").has_eoi);
        assert!(verify_scans(&short).is_err());
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
