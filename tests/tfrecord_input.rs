//! Packing from TFRecords written like `build_imagenet_data.py`, and reading them directly.

mod common;

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use common::*;
use convnets_formats::tfrecord::TfRecordSource;
use convnets_formats::{Dataset, Record, RecordSource};

/// Every fixture image of `split` is in `records` exactly once, byte-identical, with its
/// 0-based label and size.
fn check_records(fixture: &TfFixture, split: &str, records: &[Record]) -> Result<()> {
    let sources = fixture.split(split);
    ensure!(
        records.len() == sources.len(),
        "{split}: {} records for {} images",
        records.len(),
        sources.len()
    );
    let by_bytes: HashMap<&[u8], usize> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| (&s.bytes[..], i))
        .collect();
    let mut seen = vec![false; sources.len()];
    for (i, rec) in records.iter().enumerate() {
        let &s = by_bytes
            .get(&rec.data[..])
            .with_context(|| format!("{split} record {i} matches no source image"))?;
        ensure!(!seen[s], "{split}: image {s} stored twice");
        seen[s] = true;
        let src = sources[s];
        ensure!(
            rec.label == src.label,
            "{}#{}: label {} != {}",
            src.file,
            src.index,
            rec.label,
            src.label
        );
        ensure!(
            rec.label as i64 == src.stored_label - 1,
            "label offset 1 applied"
        );
        ensure!(
            (rec.width, rec.height) == (src.width, src.height),
            "{}#{}: size",
            src.file,
            src.index
        );
    }
    Ok(())
}

#[test]
fn packing_tfrecords_keeps_images_and_labels() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_tfrecords(&tmp.path().join("tfrecords"), 4, 5, 2, 11)?;
    let out = tmp.path().join("packed");
    // Auto-detected: no --format.
    pack_shards(&fixture.dir, &out, 2, 1, &[])?;
    let ds = Dataset::open(&out)?;
    let m = ds.manifest();
    // Classes from image/class/synset and image/class/text, in label order.
    let wnids: Vec<&str> = m.classes.iter().map(|c| c.wnid.as_str()).collect();
    assert_eq!(
        wnids,
        fixture.wnids.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let names: Vec<&str> = m.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        fixture.names.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(ds.split_names().collect::<Vec<_>>(), ["train", "val"]);
    assert_eq!(m.splits["train"].shards.len(), 2);
    assert_eq!(m.splits["val"].shards.len(), 1);
    check_records(&fixture, "train", &read_all(&ds, "train")?)?;
    check_records(&fixture, "val", &read_all(&ds, "val")?)?;
    assert!(
        m.created_by["source"]
            .as_str()
            .unwrap_or_default()
            .contains("tfrecord"),
        "{}",
        m.created_by
    );
    assert!(report_files(&read_report(&out)?).is_empty());

    // The explicit --format gives the same dataset.
    let out2 = tmp.path().join("packed2");
    pack_shards(&fixture.dir, &out2, 2, 1, &["--format", "tfrecord"])?;
    for ((n1, d1), (n2, d2)) in files_of(&out)?.iter().zip(&files_of(&out2)?) {
        assert_eq!(n1, n2);
        if n1.ends_with(".cnr") {
            assert!(d1 == d2, "{n1} differs");
        }
    }
    Ok(())
}

#[test]
fn tfrecord_source_reads_the_same_records() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_tfrecords(&tmp.path().join("tfrecords"), 3, 4, 3, 12)?;
    let out = tmp.path().join("packed");
    pack_shards(&fixture.dir, &out, 2, 1, &[])?;
    let ds = Dataset::open(&out)?;
    for (split, prefix) in [("train", "train"), ("val", "validation")] {
        let source = TfRecordSource::open_dir(&fixture.dir, prefix, 1)?;
        let expected = fixture.split(split);
        assert_eq!(source.len(), expected.len());
        // In file order, record by record.
        let mut records = Vec::new();
        for (i, want) in expected.iter().enumerate() {
            let rec = source.record(i)?;
            assert_eq!(&rec.data[..], &want.bytes[..], "{split} {i}");
            assert_eq!(
                (rec.label, rec.width, rec.height),
                (want.label, want.width, want.height)
            );
            let meta = source.meta(i)?;
            assert_eq!(
                (meta.label, meta.width, meta.height, meta.len as usize),
                (want.label, want.width, want.height, want.bytes.len())
            );
            let (path, k) = source.locate(i)?;
            assert_eq!(path.file_name().unwrap().to_str().unwrap(), want.file);
            assert_eq!(k as usize, want.index);
            let ex = source.example(i)?;
            assert_eq!(ex.example.synset.as_deref(), Some(want.wnid.as_str()));
            assert_eq!(ex.example.label, want.stored_label);
            records.push(rec);
        }
        assert!(source.record(source.len()).is_err());
        check_records(&fixture, split, &records)?;

        // The packed split holds the same records (in another order).
        let key = |r: &Record| (r.data.to_vec(), r.label, r.width, r.height);
        let mut direct: Vec<_> = records.iter().map(key).collect();
        let mut packed: Vec<_> = read_all(&ds, split)?.iter().map(key).collect();
        direct.sort();
        packed.sort();
        assert!(
            direct == packed,
            "{split}: packed records differ from the TFRecords"
        );
    }
    Ok(())
}

#[test]
fn a_flipped_bit_in_a_tfrecord_fails_the_pack_naming_file_and_offset() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_tfrecords(&tmp.path().join("tfrecords"), 3, 4, 2, 13)?;
    // Damage the image data of the third record of the second train file.
    let victim = fixture
        .images
        .iter()
        .find(|i| i.file == "train-00001-of-00002" && i.index == 2)
        .context("fixture record")?;
    let path = fixture.dir.join(&victim.file);
    let bytes = std::fs::read(&path)?;
    let frame = &bytes[victim.offset as usize..];
    let at = frame
        .windows(victim.bytes.len())
        .position(|w| w == &victim.bytes[..])
        .context("image bytes inside the frame")?;
    let flip = victim.offset + (at + victim.bytes.len() / 2) as u64;
    flip_bit(&path, flip, 3)?;

    let out = tmp.path().join("packed");
    let msg = expect_err(
        pack_shards(&fixture.dir, &out, 2, 1, &[]),
        &["train-00001-of-00002", &format!("byte {}", victim.offset)],
    )?;
    assert!(msg.to_lowercase().contains("crc"), "{msg}");
    assert!(!out.join("manifest.json").exists());

    // Read directly, only that record fails, with the same file and offset.
    let source = TfRecordSource::open_dir(&fixture.dir, "train", 1)?;
    let damaged = fixture
        .split("train")
        .iter()
        .position(|i| std::ptr::eq(*i, victim))
        .unwrap();
    let e = source.record(damaged).unwrap_err().to_string();
    assert!(
        e.contains("train-00001-of-00002") && e.contains(&format!("byte {}", victim.offset)),
        "{e}"
    );
    for i in (0..source.len()).filter(|&i| i != damaged) {
        source.record(i)?;
    }
    Ok(())
}

#[test]
fn a_cut_tfrecord_file_fails_naming_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_tfrecords(&tmp.path().join("tfrecords"), 2, 3, 2, 14)?;
    let path = fixture.dir.join("validation-00000-of-00001");
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() - 10])?;
    let out = tmp.path().join("packed");
    expect_err(
        pack_shards(&fixture.dir, &out, 2, 1, &[]),
        &["validation-00000-of-00001", "byte"],
    )?;
    Ok(())
}

/// Writes one extra TFRecord file of (encoded, stored label) records.
fn write_extra(path: &std::path::Path, records: &[(&[u8], i64)]) -> Result<()> {
    let mut w = convnets_formats::tfrecord::TfRecordWriter::new(Vec::new());
    for (bytes, label) in records {
        let ex = convnets_formats::tfrecord::encode_image_example(
            bytes, *label, None, None, None, None, None,
        );
        w.write_record(&ex)?;
    }
    std::fs::write(path, w.into_inner())?;
    Ok(())
}

#[test]
fn awkward_records_in_tfrecords_are_reported_by_file_and_index() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_tfrecords(&tmp.path().join("tfrecords"), 3, 3, 1, 15)?;
    // Sorts after the fixture's train files; no width/height/synset fields.
    let extra = "train-00002-of-00002-extra";
    let png = png(46, 38, 1);
    let truncated = truncated_jpeg(60, 50, 2);
    write_extra(
        &fixture.dir.join(extra),
        &[(&png, 2), (&truncated, 3), (&[], 1)],
    )?;
    let out = tmp.path().join("packed");
    pack_shards(&fixture.dir, &out, 2, 1, &[])?;

    let report = read_report(&out)?;
    let files = report_files(&report);
    let entry = |i: usize| {
        files
            .iter()
            .find(|f| f.1 == format!("{extra}#{i}"))
            .cloned()
    };
    assert_eq!(entry(0).context("png reported")?.2, "reencoded");
    assert_eq!(entry(1).context("truncated reported")?.2, "rejected");
    assert_eq!(entry(2).context("empty reported")?.2, "rejected");
    assert_eq!(files.len(), 3, "{files:#?}");

    let ds = Dataset::open(&out)?;
    let train = read_all(&ds, "train")?;
    assert_eq!(train.len(), fixture.split("train").len() + 1);
    let clean: std::collections::HashSet<&[u8]> =
        fixture.images.iter().map(|i| &i.bytes[..]).collect();
    let new: Vec<&Record> = train
        .iter()
        .filter(|r| !clean.contains(&r.data[..]))
        .collect();
    assert_eq!(new.len(), 1);
    // The true size, although the Example did not give one; label offset applied.
    assert_eq!((new[0].label, new[0].width, new[0].height), (1, 46, 38));
    Ok(())
}

#[test]
fn label_offsets() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_tfrecords(&tmp.path().join("tfrecords"), 2, 2, 1, 16)?;
    // With offset 0 the stored 1-based labels are kept: one more class, label 0 unused.
    let out = tmp.path().join("offset0");
    pack_shards(&fixture.dir, &out, 1, 1, &["--label-offset", "0"])?;
    let ds = Dataset::open(&out)?;
    assert_eq!(ds.num_classes(), 3);
    for rec in read_all(&ds, "train")? {
        assert!(rec.label >= 1);
    }
    assert_eq!(ds.manifest().classes[1].wnid, fixture.wnids[0]);

    // The background label 0 of build_imagenet_data.py cannot take the default offset 1.
    write_extra(
        &fixture.dir.join("validation-00001-of-00001"),
        &[(&baseline_jpeg(40, 40, 3), 0)],
    )?;
    let out = tmp.path().join("offset1");
    expect_err(
        pack_shards(&fixture.dir, &out, 1, 1, &[]),
        &["validation-00001-of-00001", "byte 0", "label 0"],
    )?;
    Ok(())
}
