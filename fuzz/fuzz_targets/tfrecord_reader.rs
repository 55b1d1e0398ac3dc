//! The TFRecord reader on arbitrary bytes: `TfRecordFile` (records, scan_offsets,
//! record_at), `parse_image_example` on every record, and `TfRecordSource::from_files`
//! with every record read back. No input may panic; what the source hands out must agree
//! with its metadata.
//!
//! The first byte picks how the rest becomes a file:
//! - bit 0 clear: the rest is the file as it is;
//! - bit 0 set: the rest is a sequence of `[len: u16 LE][payload]` chunks, each written as
//!   a well-formed frame (lengths and masked CRCs right), so inputs reach the Example
//!   parser instead of stopping at a CRC.
//!
//! Bit 1 opens the source on two copies of the file; bits 2..4 pick the label offset.
#![no_main]

use bytes::Bytes;
use convnets_formats::tfrecord::{
    parse_image_example, TfRecordFile, TfRecordSource, TfRecordWriter,
};
use convnets_formats::RecordSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        framed(rest)
    };
    let file = TfRecordFile::from_bytes("fuzz.tfrecord", Bytes::from(bytes));

    let mut good = Vec::new();
    for rec in file.records() {
        let Ok(rec) = rec else { break };
        let _ = parse_image_example(rec.data.clone());
        assert_eq!(
            file.record_at(rec.offset)
                .expect("a record read in order reads again"),
            rec.data
        );
        good.push(rec.offset);
    }
    if let Ok(offsets) = file.scan_offsets() {
        for &(offset, len) in &offsets {
            assert!(offset
                .checked_add(len)
                .is_some_and(|end| end <= file.size()));
        }
        // Records that read in order are exactly the leading frames that scan.
        assert!(good.iter().zip(&offsets).all(|(a, (b, _))| a == b));
    }
    // Frames that start at odd places, and past the end.
    for offset in
        (0..file.size().min(48)).chain([file.size(), file.size() + 1, u64::MAX - 3, u64::MAX])
    {
        let _ = file.record_at(offset);
    }

    let label_offset =
        [0i64, 1, -1, i64::MIN, i64::MAX, 1000, -1000, 2][usize::from(mode >> 2 & 7)];
    let files = if mode & 2 == 0 {
        vec![file.clone()]
    } else {
        vec![file.clone(), file]
    };
    let Ok(source) = TfRecordSource::from_files(files, label_offset) else {
        return;
    };
    for i in 0..source.len() {
        let meta = source.meta(i).expect("meta of an indexed record");
        let _ = source.locate(i).expect("locate of an indexed record");
        if let Ok(rec) = source.record(i) {
            assert_eq!(rec.data.len(), meta.len as usize);
            assert_eq!(
                (rec.label, rec.width, rec.height),
                (meta.label, meta.width, meta.height)
            );
            let ex = source.example(i).expect("a record that reads parses");
            assert_eq!(ex.example.encoded, rec.data);
            assert_eq!(ex.label, rec.label);
        }
    }
    let n = source.len();
    assert!(source.meta(n).is_err() && source.record(n).is_err() && source.example(n).is_err());
});

fn framed(mut rest: &[u8]) -> Vec<u8> {
    let mut w = TfRecordWriter::new(Vec::new());
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        w.write_record(&rest[2..2 + len]).expect("writing to a Vec");
        rest = &rest[2 + len..];
    }
    w.into_inner()
}
