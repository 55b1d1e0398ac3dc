//! `ShardReader::from_bytes` on arbitrary bytes, then every record read back: no input may
//! panic, and every record handed out must lie inside the file and match its index entry.
//!
//! The first byte picks how the rest becomes a file:
//! - even: the rest is the file as it is;
//! - odd: the rest is `[data_len: u16 LE][data][raw index entries]` and the harness writes
//!   header, zstd-compressed index, footer and all their checksums around it, so inputs
//!   get past the footer and index CRCs to the per-entry checks. Bit 1 makes the footer's
//!   record count `byte >> 2` instead of the index's true count; bit 2 rewrites the
//!   entries' offsets (and reserved fields) to be contiguous, so only lengths can be wrong.
#![no_main]

use std::path::Path;

use bytes::Bytes;
use convnets_formats::shard::{
    ShardReader, ENTRY_LEN, FOOTER_MAGIC, HEADER_LEN, SHARD_MAGIC, SHARD_VERSION,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        framed(mode, rest)
    };
    check(Bytes::from(file));
});

fn framed(mode: u8, rest: &[u8]) -> Vec<u8> {
    if rest.len() < 2 {
        return Vec::new();
    }
    let data_len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
    let (data, raw) = rest[2..].split_at(data_len);
    let mut raw = raw.to_vec();
    if mode & 4 != 0 {
        let mut offset = HEADER_LEN;
        for e in raw.chunks_exact_mut(ENTRY_LEN) {
            e[..8].copy_from_slice(&offset.to_le_bytes());
            e[28..32].fill(0);
            let len = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
            offset += u64::from(len);
        }
    }
    let count = if mode & 2 == 0 {
        (raw.len() / ENTRY_LEN) as u64
    } else {
        u64::from(mode >> 2)
    };
    let index = zstd::bulk::compress(&raw, 1).expect("zstd compresses anything");
    let mut f = Vec::with_capacity(16 + data.len() + index.len() + 40);
    f.extend_from_slice(&SHARD_MAGIC);
    f.extend_from_slice(&SHARD_VERSION.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(data);
    let index_offset = f.len() as u64;
    f.extend_from_slice(&index);
    let footer_start = f.len();
    f.extend_from_slice(&count.to_le_bytes());
    f.extend_from_slice(&index_offset.to_le_bytes());
    f.extend_from_slice(&(index.len() as u64).to_le_bytes());
    f.extend_from_slice(&crc32c::crc32c(&index).to_le_bytes());
    let footer_crc = crc32c::crc32c(&f[footer_start..]);
    f.extend_from_slice(&footer_crc.to_le_bytes());
    f.extend_from_slice(&FOOTER_MAGIC);
    f
}

fn check(file: Bytes) {
    let Ok(reader) = ShardReader::from_bytes(Path::new("fuzz.cnr"), file.clone()) else {
        return;
    };
    let n = reader.len();
    assert_eq!(reader.entries().len(), n);
    assert_eq!(reader.file_len(), file.len() as u64);
    for i in 0..n {
        let e = *reader.entry(i).expect("entry in range");
        assert!(e.len > 0, "record {i} is empty");
        assert!(
            e.offset >= HEADER_LEN && e.offset + u64::from(e.len) <= file.len() as u64,
            "record {i} outside the file"
        );
        let bytes = reader.record_bytes_unchecked(i).expect("record in range");
        assert_eq!(bytes.len(), e.len as usize);
        assert_eq!(
            &bytes[..],
            &file[e.offset as usize..(e.offset + u64::from(e.len)) as usize]
        );
        match reader.record(i) {
            Ok(rec) => {
                assert_eq!(rec.data, bytes);
                assert_eq!(crc32c::crc32c(&bytes), e.crc32c);
                assert_eq!(
                    (rec.label, rec.width, rec.height),
                    (e.label, e.width, e.height)
                );
            }
            Err(_) => assert_ne!(
                crc32c::crc32c(&bytes),
                e.crc32c,
                "record {i} refused with a good CRC"
            ),
        }
    }
    assert!(reader.entry(n).is_err());
    assert!(reader.record(n).is_err());
    assert!(reader.record_bytes_unchecked(n).is_err());
    assert!(reader.record(usize::MAX).is_err());
    let _ = reader.file_crc32c();
}
