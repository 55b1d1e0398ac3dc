//! One shard file: a header, the records' encoded bytes back to back, a zstd-compressed
//! index and a fixed-size footer. Layout and checks are specified in `FORMAT.md`.
//!
//! The footer sits at the end so a writer can stream records without knowing their
//! number in advance; a file cut short loses its footer and is refused as a whole.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::atomic::AtomicFile;
use crate::error::{Error, IoContext, Result};
use crate::{Record, RecordMeta};

pub const SHARD_MAGIC: [u8; 8] = *b"CNVSHARD";
pub const FOOTER_MAGIC: [u8; 8] = *b"CNVINDEX";
pub const SHARD_VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 16;
pub const FOOTER_LEN: u64 = 40;
pub const ENTRY_LEN: usize = 32;
/// zstd level for the index: the index is tiny next to the images, so favour ratio.
const INDEX_ZSTD_LEVEL: i32 = 9;

/// Index entry of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Byte offset of the record's data in the shard file.
    pub offset: u64,
    pub len: u32,
    pub label: u32,
    pub width: u32,
    pub height: u32,
    /// CRC32C (Castagnoli) of the record's data.
    pub crc32c: u32,
}

impl IndexEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        for v in [
            self.len,
            self.label,
            self.width,
            self.height,
            self.crc32c,
            0,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(b: &[u8]) -> (Self, u32) {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let offset = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let entry = Self {
            offset,
            len: u32_at(8),
            label: u32_at(12),
            width: u32_at(16),
            height: u32_at(20),
            crc32c: u32_at(24),
        };
        (entry, u32_at(28))
    }

    pub fn meta(&self) -> RecordMeta {
        RecordMeta {
            label: self.label,
            width: self.width,
            height: self.height,
            len: self.len,
        }
    }
}

/// What a finished shard looks like from outside: the manifest records this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSummary {
    pub path: PathBuf,
    pub records: u64,
    pub bytes: u64,
    /// CRC32C of the whole file.
    pub crc32c: u32,
}

/// Writes one shard; the file appears under its name only when [`ShardWriter::finish`] succeeds.
pub struct ShardWriter {
    out: AtomicFile,
    entries: Vec<IndexEntry>,
    pos: u64,
    file_crc: u32,
}

impl ShardWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let mut w = Self {
            out: AtomicFile::create(path)?,
            entries: Vec::new(),
            pos: 0,
            file_crc: 0,
        };
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(&SHARD_MAGIC);
        header.extend_from_slice(&SHARD_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes()); // flags, reserved
        w.write(&header)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.out.path().to_path_buf();
        self.out.write_all(bytes).at(&path)?;
        self.file_crc = crc32c::crc32c_append(self.file_crc, bytes);
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Appends one record. Empty records are refused: every record is an encoded image.
    pub fn append(&mut self, data: &[u8], label: u32, width: u32, height: u32) -> Result<()> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: record {} has {} bytes (must be 1..4 GiB)",
                    self.out.path().display(),
                    self.entries.len(),
                    data.len()
                ))
            })?;
        self.entries.push(IndexEntry {
            offset: self.pos,
            len,
            label,
            width,
            height,
            crc32c: crc32c::crc32c(data),
        });
        self.write(data)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes index and footer, then moves the file into place.
    pub fn finish(mut self) -> Result<ShardSummary> {
        let path = self.out.path().to_path_buf();
        let mut raw = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for e in &self.entries {
            e.encode(&mut raw);
        }
        let index = zstd::bulk::compress(&raw, INDEX_ZSTD_LEVEL).at(&path)?;
        let index_offset = self.pos;
        self.write(&index)?;
        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        footer.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        footer.extend_from_slice(&index_offset.to_le_bytes());
        footer.extend_from_slice(&(index.len() as u64).to_le_bytes());
        footer.extend_from_slice(&crc32c::crc32c(&index).to_le_bytes());
        let footer_crc = crc32c::crc32c(&footer);
        footer.extend_from_slice(&footer_crc.to_le_bytes());
        footer.extend_from_slice(&FOOTER_MAGIC);
        self.write(&footer)?;
        let summary = ShardSummary {
            path,
            records: self.entries.len() as u64,
            bytes: self.pos,
            crc32c: self.file_crc,
        };
        self.out.commit()?;
        Ok(summary)
    }
}

/// A shard mapped into memory. Records are zero-copy views of the mapping.
///
/// As with any mmap, the file must not be modified while it is open (shards are
/// written once and never changed in place, so this holds for our own files).
pub struct ShardReader {
    path: PathBuf,
    data: Bytes,
    index: Vec<IndexEntry>,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("path", &self.path)
            .field("records", &self.index.len())
            .finish()
    }
}

impl ShardReader {
    /// Maps the file and checks header, footer and index (but not record checksums).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).at(path)?;
        let len = file.metadata().at(path)?.len();
        let data = if len == 0 {
            Bytes::new()
        } else {
            // SAFETY: shards are immutable once written (see the type's docs).
            let map = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
            Bytes::from_owner(map)
        };
        Self::from_bytes(path, data)
    }

    /// Reads a shard held in memory (used by tests and fuzzing; `open` maps the file).
    pub fn from_bytes(path: &Path, data: Bytes) -> Result<Self> {
        let index = parse_index(path, &data)?;
        Ok(Self {
            path: path.to_path_buf(),
            data,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn entries(&self) -> &[IndexEntry] {
        &self.index
    }

    pub fn entry(&self, i: usize) -> Result<&IndexEntry> {
        self.index.get(i).ok_or(Error::IndexOutOfRange {
            index: i as u64,
            len: self.index.len() as u64,
        })
    }

    /// The bytes of record `i` without checking its CRC (the loader's hot path checks
    /// them itself when it wants to; `record` does).
    pub fn record_bytes_unchecked(&self, i: usize) -> Result<Bytes> {
        let e = self.entry(i)?;
        // Bounds were validated against the file when the index was parsed.
        let start = e.offset as usize;
        Ok(self.data.slice(start..start + e.len as usize))
    }

    /// Record `i`, its CRC32C checked.
    pub fn record(&self, i: usize) -> Result<Record> {
        let e = *self.entry(i)?;
        let data = self.record_bytes_unchecked(i)?;
        let actual = crc32c::crc32c(&data);
        if actual != e.crc32c {
            return Err(Error::ChecksumMismatch {
                path: self.path.clone(),
                index: i as u64,
                expected: e.crc32c,
                actual,
            });
        }
        Ok(Record {
            data,
            label: e.label,
            width: e.width,
            height: e.height,
        })
    }

    /// CRC32C of the whole file, as recorded in the manifest.
    pub fn file_crc32c(&self) -> u32 {
        crc32c::crc32c(&self.data)
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.data.len() as u64
    }
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(a)
}

/// Validates the whole structure of a shard and returns its index. Every offset is
/// checked before use, so no input can make a later read go out of bounds.
fn parse_index(path: &Path, data: &[u8]) -> Result<Vec<IndexEntry>> {
    let corrupt = |reason: String| Error::CorruptShard {
        path: path.to_path_buf(),
        reason,
    };
    let file_len = data.len() as u64;
    let magic_len = data.len().min(SHARD_MAGIC.len());
    if file_len < HEADER_LEN && data[..magic_len] == SHARD_MAGIC[..magic_len] {
        return Err(corrupt(format!(
            "file is {file_len} bytes, too short for the header (truncated?)"
        )));
    }
    if file_len < HEADER_LEN || data[..8] != SHARD_MAGIC {
        return Err(Error::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let version = u32_at(data, 8);
    if version != SHARD_VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            what: "shard",
            found: version,
            supported: SHARD_VERSION,
        });
    }
    if u32_at(data, 12) != 0 {
        return Err(corrupt("reserved header flags are not zero".into()));
    }
    if file_len < HEADER_LEN + FOOTER_LEN {
        return Err(corrupt(format!(
            "file is {file_len} bytes, too short for header and footer (truncated?)"
        )));
    }
    let f = &data[(file_len - FOOTER_LEN) as usize..];
    if f[32..40] != FOOTER_MAGIC {
        return Err(corrupt(
            "footer magic missing: the file is truncated or was never finished".into(),
        ));
    }
    let footer_crc = u32_at(f, 28);
    if crc32c::crc32c(&f[..28]) != footer_crc {
        return Err(corrupt("footer checksum mismatch".into()));
    }
    let count = u64_at(f, 0);
    let index_offset = u64_at(f, 8);
    let index_len = u64_at(f, 16);
    let index_crc = u32_at(f, 24);
    let index_end = index_offset.checked_add(index_len);
    if index_offset < HEADER_LEN || index_end != Some(file_len - FOOTER_LEN) {
        return Err(corrupt(format!(
            "index at {index_offset}+{index_len} does not end where the footer starts ({})",
            file_len - FOOTER_LEN
        )));
    }
    // Records are never empty, so a shard cannot hold more records than data bytes;
    // this bounds the allocation below by the file's size.
    if count > index_offset - HEADER_LEN {
        return Err(corrupt(format!(
            "footer claims {count} records but there are only {} data bytes",
            index_offset - HEADER_LEN
        )));
    }
    let compressed = &data[index_offset as usize..(index_offset + index_len) as usize];
    if crc32c::crc32c(compressed) != index_crc {
        return Err(corrupt("index checksum mismatch".into()));
    }
    let raw_len = count as usize * ENTRY_LEN;
    let raw = zstd::bulk::decompress(compressed, raw_len)
        .map_err(|e| corrupt(format!("index does not decompress: {e}")))?;
    if raw.len() != raw_len {
        return Err(corrupt(format!(
            "index holds {} bytes, expected {raw_len} for {count} records",
            raw.len()
        )));
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut expected_offset = HEADER_LEN;
    for (i, chunk) in raw.chunks_exact(ENTRY_LEN).enumerate() {
        let (e, reserved) = IndexEntry::decode(chunk);
        let bad = |reason: String| Error::CorruptRecord {
            path: path.to_path_buf(),
            index: i as u64,
            reason,
        };
        if reserved != 0 {
            return Err(bad("reserved index field is not zero".into()));
        }
        if e.len == 0 {
            return Err(bad("index gives the record zero length".into()));
        }
        // Records are contiguous: each starts where the previous ended.
        if e.offset != expected_offset {
            return Err(bad(format!(
                "index gives offset {}, expected {expected_offset}",
                e.offset
            )));
        }
        expected_offset = e.offset + u64::from(e.len);
        if expected_offset > index_offset {
            return Err(bad(format!(
                "record ends at byte {expected_offset}, past the end of the data ({index_offset})"
            )));
        }
        entries.push(e);
    }
    if expected_offset != index_offset {
        return Err(corrupt(format!(
            "records end at byte {expected_offset} but the index starts at {index_offset}"
        )));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_shard(dir: &Path, records: &[(&[u8], u32)]) -> (PathBuf, ShardSummary) {
        let path = dir.join("s.cnr");
        let mut w = ShardWriter::create(&path).unwrap();
        for (i, (data, label)) in records.iter().enumerate() {
            w.append(data, *label, 10 + i as u32, 20 + i as u32)
                .unwrap();
        }
        let summary = w.finish().unwrap();
        (path, summary)
    }

    #[test]
    fn round_trip() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<(&[u8], u32)> = vec![(b"hello", 3), (b"w", 0), (&[7u8; 1000], 999)];
        let (path, summary) = write_shard(dir.path(), &recs);
        let r = ShardReader::open(&path)?;
        assert_eq!(r.len(), 3);
        for (i, (data, label)) in recs.iter().enumerate() {
            let rec = r.record(i)?;
            assert_eq!(&rec.data[..], *data);
            assert_eq!(rec.label, *label);
            assert_eq!((rec.width, rec.height), (10 + i as u32, 20 + i as u32));
        }
        assert_eq!(summary.records, 3);
        assert_eq!(summary.bytes, std::fs::metadata(&path).unwrap().len());
        assert_eq!(summary.crc32c, r.file_crc32c());
        assert!(!crate::atomic::temp_path(&path).exists());
        assert!(matches!(r.record(3), Err(Error::IndexOutOfRange { .. })));
        Ok(())
    }

    #[test]
    fn empty_shard_is_valid() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_shard(dir.path(), &[]);
        assert_eq!(ShardReader::open(&path)?.len(), 0);
        Ok(())
    }

    #[test]
    fn empty_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(&dir.path().join("x.cnr")).unwrap();
        assert!(w.append(b"", 0, 1, 1).is_err());
    }

    #[test]
    fn abandoned_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cnr");
        let mut w = ShardWriter::create(&path).unwrap();
        w.append(b"abc", 0, 1, 1).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn bad_inputs_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_shard(dir.path(), &[(b"hello", 1), (b"world!", 2)]);
        let good = std::fs::read(&path).unwrap();
        let open = |b: Vec<u8>| ShardReader::from_bytes(&path, Bytes::from(b));

        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(open(b), Err(Error::BadMagic { .. })));

        let mut b = good.clone();
        b[8] = 2;
        let e = open(b).unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedVersion { found: 2, .. }),
            "{e}"
        );

        for cut in [good.len() - 1, good.len() - 40, 20, 16] {
            let e = open(good[..cut].to_vec()).unwrap_err();
            assert!(e.to_string().contains("s.cnr"), "{e}");
        }

        // A flipped bit in a record's data is caught on read, naming the record.
        let mut b = good.clone();
        b[HEADER_LEN as usize + 6] ^= 0x10;
        let r = open(b).unwrap();
        assert!(r.record(0).is_ok());
        let e = r.record(1).unwrap_err();
        assert!(matches!(e, Error::ChecksumMismatch { index: 1, .. }), "{e}");
        assert!(e.to_string().contains("record 1"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// No byte string may make the reader panic or read out of bounds.
        #[test]
        fn reader_never_panics(
            flips in proptest::collection::vec((0usize..400, 0u8..=255), 0..4),
            cut in 0usize..400,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (path, _) = write_shard(dir.path(), &[(b"abcdef", 1), (b"0123456789", 2), (b"z", 3)]);
            let mut b = std::fs::read(&path).unwrap();
            for (pos, v) in flips {
                let n = b.len();
                b[pos % n] ^= v;
            }
            b.truncate(cut.max(b.len() / 2).min(b.len()));
            if let Ok(r) = ShardReader::from_bytes(&path, Bytes::from(b)) {
                for i in 0..r.len() + 1 {
                    let _ = r.record(i);
                }
            }
        }
    }
}
