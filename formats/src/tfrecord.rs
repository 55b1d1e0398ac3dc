//! Reader (and a small writer) for TFRecord files of `tf.Example`s, as made by
//! TensorFlow's `build_imagenet_data.py` (`train-00000-of-01024`, ...).
//!
//! A TFRecord file is a plain sequence of frames:
//! `u64 len (LE) | u32 masked_crc32c(len bytes) | data[len] | u32 masked_crc32c(data)`.
//! There is no index, so [`TfRecordSource::open`] walks the frames once (reading only the
//! headers and the small Example fields) and keeps a flat table for O(1) random access;
//! the data CRC is checked each time a record is read, never at open. Files are mapped
//! with mmap and every record handed out is a zero-copy [`Bytes`] view of the mapping.
//!
//! Untrusted input: every length is checked against the file before use, nothing is
//! allocated from a length read from the file, and damage is reported as
//! [`Error::TfRecord`] naming the file and the byte offset of the frame.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;
use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::{Record, RecordMeta, RecordSource};

/// Bytes before a record's data: length and its masked CRC.
pub const HEADER_LEN: u64 = 12;
/// Bytes after a record's data: its masked CRC.
pub const FOOTER_LEN: u64 = 4;
const MASK_DELTA: u32 = 0xa282_ead8;

/// CRC32C as TensorFlow stores it: rotated and offset, because a CRC of data that
/// itself holds CRCs is weak.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

fn u32_le(b: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

fn u64_le(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}

// ---------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------

/// One record read from a file: where its frame starts and its (CRC-checked) data.
#[derive(Debug, Clone)]
pub struct TfRecordEntry {
    /// Byte offset of the frame (its length field) in the file.
    pub offset: u64,
    pub data: Bytes,
}

/// A frame whose header and length CRC have been checked and which fits in the file.
#[derive(Debug, Clone, Copy)]
struct Frame {
    offset: u64,
    len: u64,
}

impl Frame {
    fn data_start(self) -> u64 {
        self.offset + HEADER_LEN
    }
    fn data_end(self) -> u64 {
        self.data_start() + self.len
    }
    fn end(self) -> u64 {
        self.data_end() + FOOTER_LEN
    }
}

/// One TFRecord file, mapped into memory.
#[derive(Debug, Clone)]
pub struct TfRecordFile {
    path: PathBuf,
    bytes: Bytes,
}

impl TfRecordFile {
    /// Maps the file. An empty file is a valid file with no records.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).at(path)?;
        let size = file.metadata().at(path)?.len();
        let bytes = if size == 0 {
            Bytes::new()
        } else {
            // SAFETY: the mapping is read-only; like every mmap reader we rely on the file
            // not being truncated or rewritten while it is open (datasets are immutable).
            let map = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
            Bytes::from_owner(map)
        };
        Ok(Self::from_bytes(path, bytes))
    }

    /// A TFRecord file already in memory; `path` is only used in error messages.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Bytes) -> Self {
        Self {
            path: path.into(),
            bytes,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// All records in order, data CRCs checked. Stops after the first error.
    pub fn records(&self) -> Records<'_> {
        Records {
            file: self,
            pos: 0,
            done: false,
        }
    }

    /// `(offset, data length)` of every record, checking the framing and length CRCs
    /// only: it touches just the headers, so it is fast even on large files.
    pub fn scan_offsets(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < self.size() {
            let frame = self.frame_at(pos)?;
            out.push((frame.offset, frame.len));
            pos = frame.end();
        }
        Ok(out)
    }

    /// The record whose frame starts at `offset` (from [`Self::scan_offsets`] or an
    /// index file), data CRC checked.
    pub fn record_at(&self, offset: u64) -> Result<Bytes> {
        self.checked_data(self.frame_at(offset)?)
    }

    fn err(&self, offset: u64, reason: impl Into<String>) -> Error {
        Error::TfRecord {
            path: self.path.clone(),
            offset,
            reason: reason.into(),
        }
    }

    fn range(&self, start: u64, end: u64) -> Option<Range<usize>> {
        let range = usize::try_from(start).ok()?..usize::try_from(end).ok()?;
        (range.start <= range.end && range.end <= self.bytes.len()).then_some(range)
    }

    /// Reads and checks the header at `offset`, and that the whole frame fits in the file.
    fn frame_at(&self, offset: u64) -> Result<Frame> {
        let left = self.size().saturating_sub(offset);
        let header = offset
            .checked_add(HEADER_LEN)
            .and_then(|end| self.range(offset, end))
            .and_then(|r| self.bytes.get(r))
            .ok_or_else(|| {
                self.err(
                    offset,
                    format!("truncated header ({left} bytes left, need {HEADER_LEN})"),
                )
            })?;
        let (len, stored) = match (u64_le(header), header.get(8..).and_then(u32_le)) {
            (Some(len), Some(crc)) => (len, crc),
            _ => return Err(self.err(offset, "unreadable header")),
        };
        // Checked before the bounds so that a damaged length is reported as such.
        let actual = masked_crc32c(&header[..8]);
        if stored != actual {
            return Err(self.err(
                offset,
                format!("length CRC mismatch (stored {stored:#010x}, computed {actual:#010x})"),
            ));
        }
        let fits = len
            .checked_add(HEADER_LEN + FOOTER_LEN)
            .is_some_and(|need| need <= left);
        if !fits {
            let after_header = left.saturating_sub(HEADER_LEN);
            return Err(self.err(
                offset,
                format!(
                    "record length {len} runs past end of file \
                     (needs {len} + {FOOTER_LEN} bytes after the header, {after_header} left)"
                ),
            ));
        }
        Ok(Frame { offset, len })
    }

    /// The data of `frame` without checking its CRC.
    fn raw_data(&self, frame: Frame) -> Result<Bytes> {
        let range = self
            .range(frame.data_start(), frame.data_end())
            .ok_or_else(|| self.err(frame.offset, "record runs past end of file"))?;
        Ok(self.bytes.slice(range))
    }

    /// The data of `frame`, its CRC checked.
    fn checked_data(&self, frame: Frame) -> Result<Bytes> {
        let data = self.raw_data(frame)?;
        let stored = self
            .range(frame.data_end(), frame.end())
            .and_then(|r| self.bytes.get(r))
            .and_then(u32_le)
            .ok_or_else(|| self.err(frame.offset, "data CRC runs past end of file"))?;
        let actual = masked_crc32c(&data);
        if stored != actual {
            return Err(self.err(
                frame.offset,
                format!("data CRC mismatch (stored {stored:#010x}, computed {actual:#010x})"),
            ));
        }
        Ok(data)
    }
}

/// Iterator over the records of a [`TfRecordFile`]; see [`TfRecordFile::records`].
#[derive(Debug)]
pub struct Records<'a> {
    file: &'a TfRecordFile,
    pos: u64,
    done: bool,
}

impl Iterator for Records<'_> {
    type Item = Result<TfRecordEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.pos >= self.file.size() {
            return None;
        }
        let read = self.file.frame_at(self.pos).and_then(|frame| {
            let data = self.file.checked_data(frame)?;
            Ok((frame, data))
        });
        match read {
            Ok((frame, data)) => {
                self.pos = frame.end();
                Some(Ok(TfRecordEntry {
                    offset: frame.offset,
                    data,
                }))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl std::iter::FusedIterator for Records<'_> {}

// ---------------------------------------------------------------------------------------
// tf.Example, declared by hand from tensorflow/core/example/{example,feature}.proto
// ---------------------------------------------------------------------------------------

/// `tensorflow.Example`.
#[derive(Clone, PartialEq, Message)]
pub struct Example {
    #[prost(message, optional, tag = "1")]
    pub features: Option<Features>,
}

/// `tensorflow.Features`. A `BTreeMap` so that encoding is deterministic.
#[derive(Clone, PartialEq, Message)]
pub struct Features {
    #[prost(btree_map = "string, message", tag = "1")]
    pub feature: BTreeMap<String, Feature>,
}

/// `tensorflow.Feature`.
#[derive(Clone, PartialEq, Message)]
pub struct Feature {
    #[prost(oneof = "feature::Kind", tags = "1, 2, 3")]
    pub kind: Option<feature::Kind>,
}

pub mod feature {
    /// The `kind` oneof of `tensorflow.Feature`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        BytesList(super::BytesList),
        #[prost(message, tag = "2")]
        FloatList(super::FloatList),
        #[prost(message, tag = "3")]
        Int64List(super::Int64List),
    }
}

/// `tensorflow.BytesList`; values decoded from a `Bytes` buffer are views into it.
#[derive(Clone, PartialEq, Message)]
pub struct BytesList {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub value: Vec<Bytes>,
}

/// `tensorflow.FloatList`.
#[derive(Clone, PartialEq, Message)]
pub struct FloatList {
    #[prost(float, repeated, packed = "true", tag = "1")]
    pub value: Vec<f32>,
}

/// `tensorflow.Int64List`.
#[derive(Clone, PartialEq, Message)]
pub struct Int64List {
    #[prost(int64, repeated, packed = "true", tag = "1")]
    pub value: Vec<i64>,
}

/// The fields of an ImageNet Example written by `build_imagenet_data.py`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageExample {
    /// `image/encoded`: the JPEG, a view into the record.
    pub encoded: Bytes,
    /// `image/class/label`, as stored (1-based in `build_imagenet_data.py`).
    pub label: i64,
    /// `image/class/synset`, e.g. `n01440764`.
    pub synset: Option<String>,
    /// `image/class/text`, e.g. `tench, Tinca tinca`.
    pub text: Option<String>,
    pub filename: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

const KEY_ENCODED: &str = "image/encoded";
const KEY_LABEL: &str = "image/class/label";
const KEY_SYNSET: &str = "image/class/synset";
const KEY_TEXT: &str = "image/class/text";
const KEY_FILENAME: &str = "image/filename";
const KEY_WIDTH: &str = "image/width";
const KEY_HEIGHT: &str = "image/height";

/// Parses a record as an image Example. Keys other than those of [`ImageExample`] are
/// ignored. The error is a reason only; callers add the file and offset.
pub fn parse_image_example(data: Bytes) -> Result<ImageExample, String> {
    let example = Example::decode(data).map_err(|e| format!("not a tf.Example: {e}"))?;
    let features = example.features.map(|f| f.feature).unwrap_or_default();
    let encoded = single_bytes(&features, KEY_ENCODED)?
        .ok_or_else(|| format!("missing required key `{KEY_ENCODED}`"))?;
    let label = single_int(&features, KEY_LABEL)?
        .ok_or_else(|| format!("missing required key `{KEY_LABEL}`"))?;
    Ok(ImageExample {
        encoded,
        label,
        synset: single_string(&features, KEY_SYNSET)?,
        text: single_string(&features, KEY_TEXT)?,
        filename: single_string(&features, KEY_FILENAME)?,
        width: single_dim(&features, KEY_WIDTH)?,
        height: single_dim(&features, KEY_HEIGHT)?,
    })
}

fn kind_name(kind: &feature::Kind) -> &'static str {
    match kind {
        feature::Kind::BytesList(_) => "bytes_list",
        feature::Kind::FloatList(_) => "float_list",
        feature::Kind::Int64List(_) => "int64_list",
    }
}

/// The one value of a list: `None` if the key is absent or its list empty, an error if
/// it holds several (the ImageNet keys are all scalars).
fn single<T: Clone>(key: &str, values: &[T]) -> Result<Option<T>, String> {
    match values {
        [] => Ok(None),
        [v] => Ok(Some(v.clone())),
        _ => Err(format!(
            "key `{key}`: expected one value, found {}",
            values.len()
        )),
    }
}

fn single_bytes(features: &BTreeMap<String, Feature>, key: &str) -> Result<Option<Bytes>, String> {
    match features.get(key).and_then(|f| f.kind.as_ref()) {
        None => Ok(None),
        Some(feature::Kind::BytesList(list)) => single(key, &list.value),
        Some(other) => Err(format!(
            "key `{key}`: expected bytes_list, found {}",
            kind_name(other)
        )),
    }
}

fn single_int(features: &BTreeMap<String, Feature>, key: &str) -> Result<Option<i64>, String> {
    match features.get(key).and_then(|f| f.kind.as_ref()) {
        None => Ok(None),
        Some(feature::Kind::Int64List(list)) => single(key, &list.value),
        Some(other) => Err(format!(
            "key `{key}`: expected int64_list, found {}",
            kind_name(other)
        )),
    }
}

fn single_string(
    features: &BTreeMap<String, Feature>,
    key: &str,
) -> Result<Option<String>, String> {
    single_bytes(features, key)?
        .map(|b| String::from_utf8(b.to_vec()).map_err(|_| format!("key `{key}`: not UTF-8")))
        .transpose()
}

fn single_dim(features: &BTreeMap<String, Feature>, key: &str) -> Result<Option<u32>, String> {
    single_int(features, key)?
        .map(|v| u32::try_from(v).map_err(|_| format!("key `{key}`: {v} is not a valid size")))
        .transpose()
}

// ---------------------------------------------------------------------------------------
// Random access over many files
// ---------------------------------------------------------------------------------------

/// The TFRecord files in `dir` named `{prefix}-*` (e.g. `train-00000-of-01024`), sorted
/// by name. DALI index files (`*.idx`) are skipped.
pub fn list_tfrecord_files(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let start = format!("{prefix}-");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        let matches = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&start) && !n.ends_with(".idx"));
        if matches && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::Input {
            path: dir.to_path_buf(),
            reason: format!("no TFRecord files named `{start}*`"),
        });
    }
    files.sort();
    Ok(files)
}

/// Table entry of one record; 40 bytes, so all of ImageNet train takes ~51 MB.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Offset of the frame in its file.
    offset: u64,
    file: u32,
    /// Length of the record data.
    len: u32,
    /// Where `image/encoded` lies within the record data.
    enc_start: u32,
    enc_len: u32,
    label: u32,
    width: u32,
    height: u32,
}

impl Entry {
    fn frame(&self) -> Frame {
        Frame {
            offset: self.offset,
            len: u64::from(self.len),
        }
    }
}

/// One record of a [`TfRecordSource`] with all its Example fields, for the packer.
#[derive(Debug, Clone)]
pub struct SourceExample {
    /// Index of the record in the source.
    pub index: usize,
    /// The label with the source's label offset applied (`example.label` is as stored).
    pub label: u32,
    pub example: ImageExample,
}

/// Random access to the image Examples of a list of TFRecord files, in order.
///
/// `record(i).data` is the `image/encoded` field (not the whole Example), a zero-copy
/// view of the mapped file. `meta(i)` and `record(i)` give width and height from
/// `image/width` and `image/height`, or 0 when the Example lacks them.
#[derive(Debug)]
pub struct TfRecordSource {
    files: Vec<TfRecordFile>,
    /// Index of the first record of each file.
    file_starts: Vec<usize>,
    entries: Vec<Entry>,
    label_offset: i64,
}

impl TfRecordSource {
    /// Maps and indexes `files` in parallel. `label_offset` is subtracted from every
    /// stored label: pass 1 for `build_imagenet_data.py`, whose labels are 1-based.
    pub fn open(files: &[PathBuf], label_offset: i64) -> Result<Self> {
        let files = files
            .par_iter()
            .map(TfRecordFile::open)
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Self::from_files(files, label_offset)
    }

    /// [`Self::open`] on the files of [`list_tfrecord_files`]`(dir, prefix)`.
    pub fn open_dir(dir: &Path, prefix: &str, label_offset: i64) -> Result<Self> {
        Self::open(&list_tfrecord_files(dir, prefix)?, label_offset)
    }

    /// Indexes files already opened (or built in memory).
    pub fn from_files(files: Vec<TfRecordFile>, label_offset: i64) -> Result<Self> {
        if u32::try_from(files.len()).is_err() {
            return Err(Error::Invalid(format!(
                "too many TFRecord files ({})",
                files.len()
            )));
        }
        // Collected in order and then checked, so the error reported is the first one.
        let tables = files
            .par_iter()
            .enumerate()
            .map(|(i, file)| index_file(file, i as u32, label_offset))
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let mut file_starts = Vec::with_capacity(tables.len());
        let mut entries = Vec::with_capacity(tables.iter().map(Vec::len).sum());
        for table in tables {
            file_starts.push(entries.len());
            entries.extend(table);
        }
        Ok(Self {
            files,
            file_starts,
            entries,
            label_offset,
        })
    }

    /// Paths of the files, in order.
    pub fn files(&self) -> impl ExactSizeIterator<Item = &Path> + '_ {
        self.files.iter().map(TfRecordFile::path)
    }

    pub fn label_offset(&self) -> i64 {
        self.label_offset
    }

    /// Record `i` parsed in full, data CRC checked.
    pub fn example(&self, i: usize) -> Result<SourceExample> {
        let (entry, file) = self.entry(i)?;
        let data = file.checked_data(entry.frame())?;
        let example = parse_image_example(data).map_err(|reason| file.err(entry.offset, reason))?;
        Ok(SourceExample {
            index: i,
            label: entry.label,
            example,
        })
    }

    /// Every record in order, parsed in full; for parallel reads call
    /// [`Self::example`] from several threads instead.
    pub fn examples(&self) -> impl ExactSizeIterator<Item = Result<SourceExample>> + '_ {
        (0..self.entries.len()).map(|i| self.example(i))
    }

    fn entry(&self, i: usize) -> Result<(&Entry, &TfRecordFile)> {
        let entry = self.entries.get(i).ok_or(Error::IndexOutOfRange {
            index: i as u64,
            len: self.entries.len() as u64,
        })?;
        let file = self
            .files
            .get(entry.file as usize)
            .ok_or_else(|| Error::Invalid(format!("record {i}: bad file number {}", entry.file)))?;
        Ok((entry, file))
    }
}

/// Walks one file: framing, length CRCs and the small Example fields of every record.
fn index_file(file: &TfRecordFile, file_no: u32, label_offset: i64) -> Result<Vec<Entry>> {
    let offsets = file.scan_offsets()?;
    let mut entries = Vec::with_capacity(offsets.len());
    for (k, (offset, len)) in offsets.into_iter().enumerate() {
        let frame = Frame { offset, len };
        let fail = |reason: String| file.err(offset, format!("record {k}: {reason}"));
        let data = file.raw_data(frame)?;
        let ex = match parse_image_example(data.clone()) {
            Ok(ex) => ex,
            // Data CRCs are not checked at open; if the record does not parse, damage is
            // the likely cause, and a CRC mismatch says so more plainly.
            Err(reason) => {
                return Err(file
                    .checked_data(frame)
                    .err()
                    .unwrap_or_else(|| fail(reason)))
            }
        };
        let label = ex
            .label
            .checked_sub(label_offset)
            .and_then(|l| u32::try_from(l).ok())
            .ok_or_else(|| {
                fail(format!(
                    "label {} minus label offset {label_offset} is not in 0..={}",
                    ex.label,
                    u32::MAX
                ))
            })?;
        let len =
            u32::try_from(len).map_err(|_| fail(format!("{len} bytes is too large a record")))?;
        let enc = subrange(&data, &ex.encoded)
            .ok_or_else(|| fail("image/encoded was not decoded in place".into()))?;
        entries.push(Entry {
            offset,
            file: file_no,
            len,
            // Both fit: `enc` lies within data, whose length fits in u32.
            enc_start: enc.start as u32,
            enc_len: enc.len() as u32,
            label,
            width: ex.width.unwrap_or(0),
            height: ex.height.unwrap_or(0),
        });
    }
    Ok(entries)
}

/// Where `inner`, a slice of `outer` made by zero-copy decoding, lies within it.
fn subrange(outer: &Bytes, inner: &Bytes) -> Option<Range<usize>> {
    if inner.is_empty() {
        // An empty slice may not point into `outer` at all.
        return Some(0..0);
    }
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    let end = start.checked_add(inner.len())?;
    (end <= outer.len()).then_some(start..end)
}

impl RecordSource for TfRecordSource {
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Width and height are 0 for Examples without `image/width` / `image/height`.
    fn meta(&self, i: usize) -> Result<RecordMeta> {
        let (e, _) = self.entry(i)?;
        Ok(RecordMeta {
            label: e.label,
            width: e.width,
            height: e.height,
            len: e.enc_len,
        })
    }

    fn record(&self, i: usize) -> Result<Record> {
        let (e, file) = self.entry(i)?;
        let data = file.checked_data(e.frame())?;
        let start = e.enc_start as usize;
        let range = start..start.saturating_add(e.enc_len as usize);
        if range.end > data.len() {
            return Err(file.err(e.offset, "image/encoded lies outside the record"));
        }
        Ok(Record {
            data: data.slice(range),
            label: e.label,
            width: e.width,
            height: e.height,
        })
    }

    fn locate(&self, i: usize) -> Result<(PathBuf, u64)> {
        let (e, file) = self.entry(i)?;
        let first = self.file_starts.get(e.file as usize).copied().unwrap_or(0);
        Ok((file.path().to_path_buf(), i.saturating_sub(first) as u64))
    }
}

// ---------------------------------------------------------------------------------------
// Writing, for tests and fixtures
// ---------------------------------------------------------------------------------------

/// Writes TFRecord frames.
#[derive(Debug)]
pub struct TfRecordWriter<W: Write> {
    inner: W,
}

impl<W: Write> TfRecordWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner }
    }

    pub fn write_record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.inner.write_all(&len)?;
        self.inner.write_all(&masked_crc32c(&len).to_le_bytes())?;
        self.inner.write_all(data)?;
        self.inner.write_all(&masked_crc32c(data).to_le_bytes())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Encodes an Example with the keys `build_imagenet_data.py` writes (those given).
pub fn encode_image_example(
    encoded: &[u8],
    label: i64,
    synset: Option<&str>,
    text: Option<&str>,
    filename: Option<&str>,
    width: Option<u32>,
    height: Option<u32>,
) -> Vec<u8> {
    let bytes = |v: &[u8]| Feature {
        kind: Some(feature::Kind::BytesList(BytesList {
            value: vec![Bytes::copy_from_slice(v)],
        })),
    };
    let int = |v: i64| Feature {
        kind: Some(feature::Kind::Int64List(Int64List { value: vec![v] })),
    };
    let mut feature = BTreeMap::new();
    feature.insert(KEY_ENCODED.to_string(), bytes(encoded));
    feature.insert(KEY_LABEL.to_string(), int(label));
    let strings = [
        (KEY_SYNSET, synset),
        (KEY_TEXT, text),
        (KEY_FILENAME, filename),
    ];
    for (key, value) in strings {
        if let Some(v) = value {
            feature.insert(key.to_string(), bytes(v.as_bytes()));
        }
    }
    for (key, value) in [(KEY_WIDTH, width), (KEY_HEIGHT, height)] {
        if let Some(v) = value {
            feature.insert(key.to_string(), int(i64::from(v)));
        }
    }
    Example {
        features: Some(Features { feature }),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// Fake JPEG bytes, distinct per record.
    fn jpeg(i: usize) -> Vec<u8> {
        let mut v = vec![0xff, 0xd8, 0xff, 0xe0];
        v.extend((0..50 + 7 * i).map(|k| (k * 31 + i) as u8));
        v.extend([0xff, 0xd9]);
        v
    }

    fn example(i: usize) -> Vec<u8> {
        let synset = format!("n{:08}", i);
        let name = format!("{synset}_{i}.JPEG");
        encode_image_example(
            &jpeg(i),
            i as i64 + 1,
            Some(&synset),
            Some("tench, Tinca tinca"),
            Some(&name),
            Some(100 + i as u32),
            Some(200 + i as u32),
        )
    }

    fn frames(records: &[Vec<u8>]) -> Result<Vec<u8>, std::io::Error> {
        let mut w = TfRecordWriter::new(Vec::new());
        for r in records {
            w.write_record(r)?;
        }
        Ok(w.into_inner())
    }

    /// A file of `n` examples starting at example `first`.
    fn file_bytes(first: usize, n: usize) -> Result<Vec<u8>, std::io::Error> {
        frames(&(first..first + n).map(example).collect::<Vec<_>>())
    }

    fn source(bytes: Vec<u8>) -> Result<TfRecordSource> {
        TfRecordSource::from_files(vec![TfRecordFile::from_bytes("mem", bytes.into())], 1)
    }

    fn reason(e: &Error) -> (u64, &str) {
        match e {
            Error::TfRecord { offset, reason, .. } => (*offset, reason),
            _ => (u64::MAX, ""),
        }
    }

    #[test]
    fn masked_crc_known_vector() -> TestResult {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // By hand: 0xe3069283 rotated right by 15 is 0x2507c60d; plus 0xa282ead8.
        assert_eq!(0xe306_9283u32.rotate_right(15), 0x2507_c60d);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        // The framing of an empty record: length 0, its CRC, no data, the data CRC.
        let out = frames(&[vec![]])?;
        assert_eq!(out[..8], [0; 8]);
        assert_eq!(out[8..12], masked_crc32c(&[0; 8]).to_le_bytes());
        assert_eq!(out[12..], masked_crc32c(b"").to_le_bytes());
        Ok(())
    }

    #[test]
    fn round_trip_through_files() -> TestResult {
        let dir = tempfile::tempdir()?;
        // Written out of order and among other files, to exercise the listing.
        std::fs::write(dir.path().join("train-00001-of-00002"), file_bytes(3, 2)?)?;
        std::fs::write(dir.path().join("train-00000-of-00002"), file_bytes(0, 3)?)?;
        std::fs::write(
            dir.path().join("validation-00000-of-00001"),
            file_bytes(9, 1)?,
        )?;
        std::fs::write(dir.path().join("train-00000-of-00002.idx"), b"0 100\n")?;
        std::fs::write(dir.path().join("trainer"), b"")?;
        let files = list_tfrecord_files(dir.path(), "train")?;
        let names: Vec<_> = files
            .iter()
            .filter_map(|p| p.file_name()?.to_str())
            .collect();
        assert_eq!(names, ["train-00000-of-00002", "train-00001-of-00002"]);

        let src = TfRecordSource::open(&files, 1)?;
        assert_eq!(src.len(), 5);
        for i in 0..5 {
            let rec = src.record(i)?;
            assert_eq!(rec.data, jpeg(i));
            assert_eq!(
                (rec.label, rec.width, rec.height),
                (i as u32, 100 + i as u32, 200 + i as u32)
            );
            let meta = src.meta(i)?;
            assert_eq!(
                meta,
                RecordMeta {
                    label: i as u32,
                    width: rec.width,
                    height: rec.height,
                    len: jpeg(i).len() as u32
                }
            );
            let (path, k) = src.locate(i)?;
            assert_eq!(path, files[i / 3]);
            assert_eq!(k, (i % 3) as u64);
        }
        assert!(matches!(
            src.record(5),
            Err(Error::IndexOutOfRange { index: 5, len: 5 })
        ));
        assert!(matches!(src.locate(5), Err(Error::IndexOutOfRange { .. })));

        let all = src.examples().collect::<Result<Vec<_>>>()?;
        assert_eq!(all.len(), 5);
        for (i, ex) in all.iter().enumerate() {
            assert_eq!(
                (ex.index, ex.label, ex.example.label),
                (i, i as u32, i as i64 + 1)
            );
            assert_eq!(
                ex.example.synset.as_deref(),
                Some(format!("n{i:08}").as_str())
            );
            assert_eq!(ex.example.text.as_deref(), Some("tench, Tinca tinca"));
            assert_eq!(ex.example.filename, Some(format!("n{i:08}_{i}.JPEG")));
            assert_eq!(ex.example.encoded, jpeg(i));
        }
        let val = TfRecordSource::open_dir(dir.path(), "validation", 1)?;
        assert_eq!(val.record(0)?.data, jpeg(9));
        Ok(())
    }

    #[test]
    fn record_is_zero_copy() -> TestResult {
        let file = TfRecordFile::from_bytes("mem", Bytes::from(file_bytes(0, 2)?));
        let whole = file.bytes.clone();
        let src = TfRecordSource::from_files(vec![file], 1)?;
        let rec = src.record(1)?;
        assert!(subrange(&whole, &rec.data).is_some_and(|r| r.len() == jpeg(1).len()));
        Ok(())
    }

    #[test]
    fn listing_without_match_errors() -> TestResult {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("validation-00000-of-00001"), b"")?;
        let err = list_tfrecord_files(dir.path(), "train").err();
        assert!(
            matches!(&err, Some(Error::Input { reason, .. }) if reason.contains("train-")),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn empty_file_has_no_records() -> TestResult {
        let f = tempfile::NamedTempFile::new()?;
        let file = TfRecordFile::open(f.path())?;
        assert_eq!(file.records().count(), 0);
        assert!(file.scan_offsets()?.is_empty());
        let src = TfRecordSource::open(&[f.path().to_path_buf()], 1)?;
        assert!(src.is_empty());
        Ok(())
    }

    #[test]
    fn missing_size_gives_zero() -> TestResult {
        let rec = encode_image_example(b"jpeg", 7, None, None, None, None, None);
        let src = source(frames(&[rec])?)?;
        let meta = src.meta(0)?;
        assert_eq!(
            (meta.label, meta.width, meta.height, meta.len),
            (6, 0, 0, 4)
        );
        let ex = src.example(0)?.example;
        assert_eq!(
            (ex.synset, ex.text, ex.filename, ex.width),
            (None, None, None, None)
        );
        Ok(())
    }

    #[test]
    fn records_and_offsets_agree() -> TestResult {
        let bytes = file_bytes(0, 3)?;
        let file = TfRecordFile::from_bytes("mem", bytes.into());
        let entries = file.records().collect::<Result<Vec<_>>>()?;
        let offsets = file.scan_offsets()?;
        assert_eq!(entries.len(), 3);
        for ((e, (off, len)), i) in entries.iter().zip(&offsets).zip(0..) {
            assert_eq!((e.offset, e.data.len() as u64), (*off, *len));
            assert_eq!(e.data, example(i));
            assert_eq!(file.record_at(*off)?, example(i));
        }
        Ok(())
    }

    #[test]
    fn flipped_data_bit_fails_on_access() -> TestResult {
        let mut bytes = file_bytes(0, 2)?;
        let second = (HEADER_LEN + FOOTER_LEN) as usize + example(0).len();
        // Flip a bit inside the JPEG payload of record 1 so the Example still parses.
        let jpeg_at =
            second + HEADER_LEN as usize + find(&example(1), &jpeg(1)).ok_or("no jpeg")? + 10;
        bytes[jpeg_at] ^= 0x10;
        let src = source(bytes.clone())?;
        assert!(src.record(0).is_ok());
        let err = src.record(1).err().ok_or("expected an error")?;
        let (offset, why) = reason(&err);
        assert_eq!(offset, second as u64);
        assert!(why.contains("data CRC mismatch"), "{err}");
        let file = TfRecordFile::from_bytes("mem", bytes.into());
        let results: Vec<_> = file.records().collect();
        assert!(results.len() == 2 && results[0].is_ok() && results[1].is_err());
        Ok(())
    }

    #[test]
    fn damaged_example_reports_crc_at_open() -> TestResult {
        let mut bytes = file_bytes(0, 1)?;
        // The first byte of the Example is a field tag; 0x0b makes it an unknown group.
        bytes[HEADER_LEN as usize] ^= 0x01;
        let err = source(bytes).err().ok_or("expected an error")?;
        assert_eq!(reason(&err).0, 0);
        assert!(reason(&err).1.contains("data CRC mismatch"), "{err}");
        Ok(())
    }

    #[test]
    fn flipped_length_bit_fails_at_open() -> TestResult {
        let mut bytes = file_bytes(0, 2)?;
        let second = (HEADER_LEN + FOOTER_LEN) as usize + example(0).len();
        bytes[second + 1] ^= 0x04;
        let err = source(bytes).err().ok_or("expected an error")?;
        assert_eq!(reason(&err).0, second as u64);
        assert!(reason(&err).1.contains("length CRC mismatch"), "{err}");
        Ok(())
    }

    #[test]
    fn huge_length_with_valid_crc_errors() -> TestResult {
        for len in [u64::MAX, u64::MAX - 15, 1 << 40, 5] {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend(masked_crc32c(&bytes).to_le_bytes());
            bytes.extend([0; 8]);
            let file = TfRecordFile::from_bytes("mem", bytes.into());
            let err = file.scan_offsets().err().ok_or("expected an error")?;
            assert!(reason(&err).1.contains("runs past end of file"), "{err}");
            assert!(file.records().next().is_some_and(|r| r.is_err()));
        }
        Ok(())
    }

    #[test]
    fn truncation_at_every_byte() -> TestResult {
        let bytes = file_bytes(0, 2)?;
        let boundary = (HEADER_LEN + FOOTER_LEN) as usize + example(0).len();
        for cut in 0..bytes.len() {
            let cut_bytes = bytes[..cut].to_vec();
            let expected = match cut {
                0 => Some(0),
                c if c == boundary => Some(1),
                _ => None,
            };
            let file = TfRecordFile::from_bytes("mem", cut_bytes.clone().into());
            let results: Vec<_> = file.records().collect();
            match (expected, source(cut_bytes)) {
                (Some(n), Ok(src)) => {
                    assert_eq!(src.len(), n);
                    assert!(results.len() == n && results.iter().all(|r| r.is_ok()));
                }
                (None, Err(Error::TfRecord { offset, .. })) => {
                    assert_eq!(offset, if cut < boundary { 0 } else { boundary as u64 });
                    assert!(results.last().is_some_and(|r| r.is_err()), "cut {cut}");
                }
                (_, other) => panic!("cut at {cut}: {other:?}"),
            }
        }
        Ok(())
    }

    #[test]
    fn bad_labels_are_refused() -> TestResult {
        for (label, offset) in [(0, 1), (i64::MIN, 1), (1 << 33, 0), (-1, 0)] {
            let rec = encode_image_example(b"x", label, None, None, None, None, None);
            let bytes = frames(&[example(0), rec])?;
            let err = TfRecordSource::from_files(
                vec![TfRecordFile::from_bytes("mem", bytes.into())],
                offset,
            )
            .err()
            .ok_or("expected an error")?;
            let (at, why) = reason(&err);
            assert_eq!(at, HEADER_LEN + FOOTER_LEN + example(0).len() as u64);
            assert!(why.contains("record 1: label"), "{err}");
        }
        Ok(())
    }

    fn feature(kind: feature::Kind) -> Feature {
        Feature { kind: Some(kind) }
    }

    fn encode(pairs: Vec<(&str, Feature)>) -> Bytes {
        let feature = pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Example {
            features: Some(Features { feature }),
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn parse_checks_keys_and_types() {
        let bytes = |v: &[&[u8]]| {
            feature(feature::Kind::BytesList(BytesList {
                value: v.iter().map(|b| Bytes::copy_from_slice(b)).collect(),
            }))
        };
        let ints = |v: &[i64]| feature(feature::Kind::Int64List(Int64List { value: v.to_vec() }));
        let floats = |v: &[f32]| feature(feature::Kind::FloatList(FloatList { value: v.to_vec() }));

        // Extra keys of other types are ignored, as in the real ImageNet files.
        let ok = parse_image_example(encode(vec![
            ("image/encoded", bytes(&[b"jpg"])),
            ("image/class/label", ints(&[3])),
            ("image/format", bytes(&[b"JPEG"])),
            ("image/channels", ints(&[3])),
            ("image/object/bbox/xmin", floats(&[0.1, 0.2])),
        ]));
        assert_eq!(
            ok.map(|e| (e.encoded, e.label)),
            Ok((Bytes::from_static(b"jpg"), 3))
        );

        let cases: Vec<(Vec<(&str, Feature)>, &str)> = vec![
            (
                vec![("image/class/label", ints(&[1]))],
                "missing required key `image/encoded`",
            ),
            (
                vec![("image/encoded", bytes(&[b"j"]))],
                "missing required key `image/class/label`",
            ),
            (
                vec![
                    ("image/encoded", bytes(&[b"j"])),
                    ("image/class/label", bytes(&[b"1"])),
                ],
                "key `image/class/label`: expected int64_list, found bytes_list",
            ),
            (
                vec![
                    ("image/encoded", floats(&[1.0])),
                    ("image/class/label", ints(&[1])),
                ],
                "key `image/encoded`: expected bytes_list, found float_list",
            ),
            (
                vec![
                    ("image/encoded", bytes(&[b"a", b"b"])),
                    ("image/class/label", ints(&[1])),
                ],
                "key `image/encoded`: expected one value, found 2",
            ),
            (
                vec![
                    ("image/encoded", bytes(&[b"j"])),
                    ("image/class/label", ints(&[1])),
                    ("image/width", ints(&[-4])),
                ],
                "key `image/width`: -4 is not a valid size",
            ),
            (
                vec![
                    ("image/encoded", bytes(&[b"j"])),
                    ("image/class/label", ints(&[1])),
                    ("image/class/synset", bytes(&[b"\xff"])),
                ],
                "key `image/class/synset`: not UTF-8",
            ),
        ];
        for (pairs, want) in cases {
            assert_eq!(
                parse_image_example(encode(pairs)).err().as_deref(),
                Some(want)
            );
        }
        let garbage = parse_image_example(Bytes::from_static(b"\x0b\x0c\xff"));
        assert!(garbage.is_err_and(|e| e.starts_with("not a tf.Example")));
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// Opens, iterates and reads everything; only the absence of panics matters.
    fn exercise(bytes: Vec<u8>) {
        let file = TfRecordFile::from_bytes("mem", bytes.into());
        let _ = file.records().count();
        let _ = file.scan_offsets();
        if let Ok(src) = TfRecordSource::from_files(vec![file], 1) {
            for i in 0..src.len() + 1 {
                let _ = (src.record(i), src.meta(i), src.locate(i), src.example(i));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn mutations_never_panic(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = file_bytes(0, 3).unwrap_or_default();
            for (at, xor) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= xor;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            exercise(bytes);
        }

        /// Damaged Examples with valid CRCs reach the parser.
        #[test]
        fn damaged_examples_never_panic(
            flips in prop::collection::vec((0..3usize, any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 3),
        ) {
            let mut records: Vec<Vec<u8>> = (0..3).map(example).collect();
            for (r, at, xor) in flips {
                let i = at.index(records[r].len());
                records[r][i] ^= xor;
            }
            for (r, cut) in records.iter_mut().zip(cuts) {
                if cut.index(4) == 0 {
                    let n = cut.index(r.len() + 1);
                    r.truncate(n);
                }
            }
            exercise(frames(&records).unwrap_or_default());
        }

        /// Lengths with valid CRCs are still checked against the file.
        #[test]
        fn forged_lengths_never_panic(record in 0..3usize, len in any::<u64>()) {
            let mut bytes = file_bytes(0, 3).unwrap_or_default();
            let at: usize = (0..record).map(|i| example(i).len() + 16).sum();
            bytes[at..at + 8].copy_from_slice(&len.to_le_bytes());
            let crc = masked_crc32c(&len.to_le_bytes()).to_le_bytes();
            bytes[at + 8..at + 12].copy_from_slice(&crc);
            exercise(bytes);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            exercise(bytes);
        }
    }
}
