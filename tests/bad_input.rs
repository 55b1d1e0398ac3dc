//! Reader robustness: every kind of damage to a dataset folder is an `Err` naming the
//! file (and the record where there is one), never a panic, and `convnets verify`
//! lists it and fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use common::*;
use convnets_formats::shard::{ShardReader, ENTRY_LEN};
use convnets_formats::verify::{verify, VerifyOptions, VerifyReport};
use convnets_formats::{Dataset, RecordSource};

/// A small packed dataset: 2 train shards, 1 val shard.
fn packed(tmp: &Path) -> Result<PathBuf> {
    let spec = ImageNetSpec {
        classes: 3,
        train_per_class: 4,
        val_per_class: 2,
        ..Default::default()
    };
    let fixture = make_imagenet(&tmp.join("imagenet"), &spec)?;
    let out = tmp.join("packed");
    pack_shards(&fixture.root, &out, 2, 1, &[])?;
    Ok(out)
}

/// Shard file names of a split, in manifest order.
fn shards_of(out: &Path, split: &str) -> Result<Vec<String>> {
    let ds = Dataset::open(out)?;
    Ok(ds.manifest().splits[split]
        .shards
        .iter()
        .map(|s| s.file.clone())
        .collect())
}

fn edit_manifest(out: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Result<()> {
    let path = out.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    edit(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m)?)?;
    Ok(())
}

fn err_string<T: std::fmt::Debug, E: std::fmt::Display>(
    r: std::result::Result<T, E>,
    what: &str,
) -> Result<String> {
    match r {
        Ok(v) => anyhow::bail!("{what}: expected an error, got {v:?}"),
        Err(e) => Ok(e.to_string()),
    }
}

fn assert_contains(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "'{msg}' lacks '{n}'");
    }
}

fn verify_lib(out: &Path) -> Result<VerifyReport> {
    Ok(verify(
        out,
        &VerifyOptions {
            decode: None,
            threads: 2,
        },
    )?)
}

/// `convnets verify` fails, with a message that names the dataset, and a failure exit.
fn assert_cli_verify_fails(out: &Path, needles: &[&str]) -> Result<()> {
    let dir = out.to_str().context("utf-8 path")?;
    expect_err(convnets(&["verify", dir]), needles)?;
    assert_eq!(
        convnets_tools::main_with(["convnets", "verify", dir]),
        ExitCode::FAILURE
    );
    Ok(())
}

/// The report lists damage in `file` (at `record`, when given), and only there.
fn assert_damage(report: &VerifyReport, file: &str, record: Option<u64>) {
    assert!(!report.is_clean());
    assert!(
        report.damage.iter().all(|d| d.file == file),
        "{:#?}",
        report.damage
    );
    if let Some(r) = record {
        assert!(
            report.damage.iter().any(|d| d.record == Some(r)),
            "record {r} not listed: {:#?}",
            report.damage
        );
    }
}

#[test]
fn a_clean_dataset_verifies() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let report = verify_lib(&out)?;
    assert!(report.is_clean(), "{:#?}", report.damage);
    assert_eq!((report.shards, report.records), (3, 12 + 6));
    let dir = out.to_str().unwrap();
    convnets(&["verify", dir])?;
    convnets(&["verify", dir, "--decode", "--json"])?;
    convnets(&["inspect", dir])?;
    convnets(&["inspect", dir, "--json"])?;
    assert_eq!(
        convnets_tools::main_with(["convnets", "verify", dir]),
        ExitCode::SUCCESS
    );
    Ok(())
}

#[test]
fn truncated_shard() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let victim = shards_of(&out, "train")?[1].clone();
    let good = std::fs::read(out.join(&victim))?;
    for cut in [good.len() / 2, good.len() - 1, good.len() - 40, 20, 8, 0] {
        std::fs::write(out.join(&victim), &good[..cut])?;
        let ds = Dataset::open(&out)?;
        let msg = err_string(ds.split("train"), &format!("cut at {cut}"))?;
        assert_contains(&msg, &[&victim]);
        ds.split("val")?;
        assert_damage(&verify_lib(&out)?, &victim, None);
    }
    assert_cli_verify_fails(&out, &["problems"])?;
    Ok(())
}

#[test]
fn flipped_bit_in_a_record() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let shards = shards_of(&out, "train")?;
    // Record 2 of the second train shard.
    let victim = &shards[1];
    let entry = ShardReader::open(&out.join(victim))?.entries()[2];
    flip_bit(
        &out.join(victim),
        entry.offset + u64::from(entry.len) / 2,
        5,
    )?;

    let ds = Dataset::open(&out)?;
    let train = ds.split("train")?; // the index is intact: opening succeeds
    let first = ds.manifest().splits["train"].shards[0].records as usize;
    let damaged = first + 2;
    let msg = err_string(train.record(damaged), "damaged record")?;
    assert_contains(&msg, &[victim, "record 2"]);
    assert_eq!(train.locate(damaged)?, (out.join(victim), 2));
    for i in (0..train.len()).filter(|&i| i != damaged) {
        train
            .record(i)
            .with_context(|| format!("record {i} must still read"))?;
    }
    // The unchecked path hands out the bytes as they are.
    assert_eq!(
        train.record_unchecked(damaged)?.data.len(),
        entry.len as usize
    );

    let report = verify_lib(&out)?;
    assert_damage(&report, victim, Some(2));
    assert!(report.damage.iter().all(|d| d.split == "train"));
    assert_eq!(report.records, 18, "every record is still checked");
    assert_cli_verify_fails(&out, &["problems", out.to_str().unwrap()])?;
    Ok(())
}

#[test]
fn wrong_magic_and_wrong_version() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let victim = shards_of(&out, "val")?[0].clone();
    let path = out.join(&victim);
    let good = std::fs::read(&path)?;

    let mut bad = good.clone();
    bad[..8].copy_from_slice(b"PK\x03\x04ZIP!");
    std::fs::write(&path, &bad)?;
    let msg = err_string(Dataset::open(&out)?.split("val"), "bad magic")?;
    assert_contains(&msg, &[&victim, "magic"]);
    assert_damage(&verify_lib(&out)?, &victim, None);
    assert_cli_verify_fails(&out, &["problems"])?;

    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&path, &bad)?;
    let msg = err_string(Dataset::open(&out)?.split("val"), "version 2")?;
    assert_contains(&msg, &[&victim, "version 2"]);
    assert_damage(&verify_lib(&out)?, &victim, None);
    assert_cli_verify_fails(&out, &["problems"])?;
    Ok(())
}

#[test]
fn manifest_naming_a_file_outside_the_folder() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let victim = shards_of(&out, "val")?[0].clone();
    // A valid shard outside the dataset folder: it must not be opened.
    std::fs::copy(out.join(&victim), tmp.path().join("outside.cnr"))?;
    for evil in ["../outside.cnr", "/etc/passwd", "sub/../../outside.cnr"] {
        edit_manifest(&out, |m| {
            m["splits"]["val"]["shards"][0]["file"] = evil.into()
        })?;
        let msg = err_string(Dataset::open(&out), evil)?;
        assert_contains(&msg, &["manifest.json", evil]);
        assert_cli_verify_fails(&out, &["manifest.json"])?;
    }
    Ok(())
}

#[test]
fn manifest_record_count_disagrees_with_the_shard() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let victim = shards_of(&out, "train")?[0].clone();
    // Consistent within the manifest, wrong about the shard.
    edit_manifest(&out, |m| {
        let split = &mut m["splits"]["train"];
        split["records"] = (split["records"].as_u64().unwrap() + 1).into();
        let shard = &mut split["shards"][0];
        shard["records"] = (shard["records"].as_u64().unwrap() + 1).into();
    })?;
    let msg = err_string(Dataset::open(&out)?.split("train"), "count")?;
    assert_contains(&msg, &[&victim, "records"]);
    assert_damage(&verify_lib(&out)?, &victim, None);
    assert_cli_verify_fails(&out, &["problems"])?;

    // Inconsistent within the manifest: refused at open.
    edit_manifest(&out, |m| {
        let shard = &mut m["splits"]["train"]["shards"][1];
        shard["records"] = (shard["records"].as_u64().unwrap() + 5).into();
    })?;
    let msg = err_string(Dataset::open(&out), "split total")?;
    assert_contains(&msg, &["manifest.json", "train"]);
    assert_cli_verify_fails(&out, &["manifest.json"])?;
    Ok(())
}

/// Rewrites a shard with its index entries changed by `edit` (index re-compressed,
/// index and footer CRCs recomputed), so only the entries themselves are wrong.
fn rewrite_index(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
    let bytes = std::fs::read(path)?;
    let f = read_footer(&bytes);
    let (start, end) = (
        f.index_offset as usize,
        (f.index_offset + f.index_len) as usize,
    );
    let mut raw = zstd::decode_all(&bytes[start..end])?;
    assert_eq!(raw.len(), f.count as usize * ENTRY_LEN);
    edit(&mut raw);
    let index = zstd::encode_all(&raw[..], 3)?;
    let mut out = bytes[..start].to_vec();
    out.extend_from_slice(&index);
    out.extend_from_slice(&encode_footer(&Footer {
        count: (raw.len() / ENTRY_LEN) as u64,
        index_offset: f.index_offset,
        index_len: index.len() as u64,
        index_crc: crc32c(&index),
    }));
    std::fs::write(path, out)?;
    Ok(())
}

fn set_u64(raw: &mut [u8], entry: usize, field: usize, v: u64) {
    let at = entry * ENTRY_LEN + field;
    raw[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn set_u32(raw: &mut [u8], entry: usize, field: usize, v: u32) {
    let at = entry * ENTRY_LEN + field;
    raw[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn index_pointing_past_the_end() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let victim = shards_of(&out, "train")?[0].clone();
    let path = out.join(&victim);
    let good = std::fs::read(&path)?;
    let n = ShardReader::open(&path)?.len();
    let last = n - 1;
    let file_len = good.len() as u64;

    // Sanity: re-sealing an unchanged index gives a shard that reads.
    rewrite_index(&path, |_| {})?;
    Dataset::open(&out)?.split("train")?;

    // (entry, what to do, does the error name the record?)
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, Option<usize>)> = vec![
        (
            "last record longer than the data",
            Box::new(move |raw| set_u32(raw, last, 8, 1 << 20)),
            Some(last),
        ),
        (
            "first record at the end of the file",
            Box::new(move |raw| set_u64(raw, 0, 0, file_len + 100)),
            Some(0),
        ),
        (
            "offset near u64::MAX",
            Box::new(|raw| set_u64(raw, 1, 0, u64::MAX - 3)),
            Some(1),
        ),
        (
            "length u32::MAX",
            Box::new(|raw| set_u32(raw, 0, 8, u32::MAX)),
            Some(0),
        ),
        (
            "zero length",
            Box::new(|raw| set_u32(raw, 1, 8, 0)),
            Some(1),
        ),
        (
            "more entries than data",
            Box::new(|raw| raw.extend_from_within(..ENTRY_LEN)),
            None,
        ),
    ];
    for (what, edit, record) in cases {
        std::fs::write(&path, &good)?;
        rewrite_index(&path, edit)?;
        let msg = err_string(Dataset::open(&out)?.split("train"), what)?;
        assert_contains(&msg, &[&victim]);
        if let Some(r) = record {
            assert_contains(&msg, &[&format!("record {r}")]);
        }
        let report = verify_lib(&out)?;
        assert_damage(&report, &victim, record.map(|r| r as u64));
        assert_cli_verify_fails(&out, &["problems"])?;
    }

    // Data region cut short under an intact index: the footer is re-sealed to point at
    // the index where it now lies, so only the records' extent is wrong.
    let f = read_footer(&good);
    let cut = 100usize;
    let mut bad = good[..f.index_offset as usize - cut].to_vec();
    bad.extend_from_slice(&good[f.index_offset as usize..(f.index_offset + f.index_len) as usize]);
    bad.extend_from_slice(&encode_footer(&Footer {
        index_offset: f.index_offset - cut as u64,
        ..f
    }));
    std::fs::write(&path, &bad)?;
    let msg = err_string(Dataset::open(&out)?.split("train"), "short data")?;
    assert_contains(&msg, &[&victim, &format!("record {last}")]);

    // Footer claiming an absurd record count (with a valid footer CRC).
    let mut bad = good[..good.len() - SHARD_FOOTER_LEN].to_vec();
    bad.extend_from_slice(&encode_footer(&Footer {
        count: u64::MAX / 2,
        ..f
    }));
    std::fs::write(&path, &bad)?;
    let msg = err_string(Dataset::open(&out)?.split("train"), "huge count")?;
    assert_contains(&msg, &[&victim]);
    Ok(())
}

#[test]
fn missing_shard_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let victim = shards_of(&out, "val")?[0].clone();
    std::fs::remove_file(out.join(&victim))?;
    let ds = Dataset::open(&out)?;
    let msg = err_string(ds.split("val"), "missing shard")?;
    assert_contains(&msg, &[&victim]);
    ds.split("train")?;
    let report = verify_lib(&out)?;
    assert_damage(&report, &victim, None);
    assert_cli_verify_fails(&out, &["problems"])?;
    Ok(())
}

#[test]
fn nonexistent_or_empty_dataset_folder() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let nowhere = tmp.path().join("no-such-dataset");
    let msg = err_string(Dataset::open(&nowhere), "nonexistent")?;
    assert_contains(&msg, &["no-such-dataset"]);
    let dir = nowhere.to_str().unwrap();
    expect_err(convnets(&["verify", dir]), &["no-such-dataset"])?;
    expect_err(convnets(&["inspect", dir]), &["no-such-dataset"])?;
    assert_eq!(
        convnets_tools::main_with(["convnets", "verify", dir]),
        ExitCode::FAILURE
    );

    // A folder without a manifest, and a file where the folder should be.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty)?;
    assert_contains(
        &err_string(Dataset::open(&empty), "empty folder")?,
        &["manifest.json"],
    );
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a folder")?;
    assert_contains(&err_string(Dataset::open(&file), "a file")?, &["a-file"]);

    // An unknown split is an error naming what there is.
    let out = packed(tmp.path())?;
    let msg = err_string(Dataset::open(&out)?.split("test"), "unknown split")?;
    assert_contains(&msg, &["test", "train", "val"]);
    Ok(())
}

#[test]
fn bad_manifests() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let path = out.join("manifest.json");
    let good = std::fs::read(&path)?;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"{not json".to_vec()),
        ("empty", Vec::new()),
        (
            "wrong type",
            br#"{"format": "convnets-dataset", "version": "one"}"#.to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, bytes)?;
        assert_contains(&err_string(Dataset::open(&out), what)?, &["manifest.json"]);
        assert_cli_verify_fails(&out, &["manifest.json"])?;
    }
    std::fs::write(&path, &good)?;
    edit_manifest(&out, |m| m["version"] = 99.into())?;
    assert_contains(
        &err_string(Dataset::open(&out), "version")?,
        &["manifest.json", "99"],
    );
    std::fs::write(&path, &good)?;
    edit_manifest(&out, |m| m["format"] = "something-else".into())?;
    assert_contains(
        &err_string(Dataset::open(&out), "format")?,
        &["manifest.json", "something-else"],
    );
    std::fs::write(&path, &good)?;
    edit_manifest(&out, |m| {
        let first = m["splits"]["train"]["shards"][0].clone();
        m["splits"]["val"]["shards"][0] = first;
    })?;
    assert_contains(
        &err_string(Dataset::open(&out), "listed twice")?,
        &["manifest.json"],
    );
    Ok(())
}

#[test]
fn label_not_below_the_number_of_classes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    // Drop the last class: records of label 2 now name no class.
    edit_manifest(&out, |m| {
        m["classes"].as_array_mut().unwrap().pop();
    })?;
    let ds = Dataset::open(&out)?;
    assert_eq!(ds.num_classes(), 2);
    // The first offending record, in manifest order.
    let mut first = None;
    for s in &ds.manifest().splits["train"].shards {
        let reader = ShardReader::open(&out.join(&s.file))?;
        if let Some(i) = reader.entries().iter().position(|e| e.label >= 2) {
            first = Some((s.file.clone(), i));
            break;
        }
    }
    let (file, index) = first.context("the fixture has records of label 2")?;
    let msg = err_string(ds.split("train"), "label")?;
    assert_contains(&msg, &[&file, &format!("record {index}"), "label 2"]);

    let report = verify_lib(&out)?;
    assert!(!report.is_clean());
    assert!(
        report.damage.iter().any(|d| d.file == file
            && d.record == Some(index as u64)
            && d.reason.contains("label")),
        "{:#?}",
        report.damage
    );
    assert_cli_verify_fails(&out, &["problems"])?;
    Ok(())
}

#[test]
fn flipped_bit_in_the_index_or_footer() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = packed(tmp.path())?;
    let victim = shards_of(&out, "train")?[1].clone();
    let path = out.join(&victim);
    let good = std::fs::read(&path)?;
    let f = read_footer(&good);
    let footer_start = good.len() - SHARD_FOOTER_LEN;
    let places = [
        ("index", f.index_offset as usize + f.index_len as usize / 2),
        ("footer count", footer_start),
        ("footer index offset", footer_start + 8),
        ("footer index CRC", footer_start + 24),
        ("footer CRC", footer_start + 28),
        ("footer magic", footer_start + 35),
        ("header flags", 13),
    ];
    for (what, at) in places {
        let mut bad = good.clone();
        bad[at] ^= 0x04;
        std::fs::write(&path, &bad)?;
        let msg = err_string(Dataset::open(&out)?.split("train"), what)?;
        assert_contains(&msg, &[&victim]);
        assert_damage(&verify_lib(&out)?, &victim, None);
    }
    Ok(())
}
