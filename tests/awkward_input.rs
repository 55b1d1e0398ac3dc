//! Awkward and broken input files: CMYK, grayscale, progressive and PNG-named-.JPEG are
//! re-encoded (or skipped), truncated, empty, text and bomb files are refused, and every
//! one of them is named in `pack-report.json`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::*;
use convnets_formats::jpeg::{self, Process};
use convnets_formats::{Dataset, Record};
use convnets_pack::sanitize::{sanitize, Outcome, SanitizeOptions};

/// A small clean folder with every awkward file added to `train/<second class>/`.
fn fixture_with_awkward(
    root: &std::path::Path,
) -> Result<(ImageNetFixture, Vec<AwkwardFile>, String)> {
    let spec = ImageNetSpec {
        classes: 3,
        train_per_class: 4,
        val_per_class: 2,
        ..Default::default()
    };
    let fixture = make_imagenet(root, &spec)?;
    let wnid = fixture.wnids[1].clone();
    let awkward = awkward_files();
    for a in &awkward {
        fixture.add_file(&format!("train/{wnid}/{}", a.name), &a.bytes)?;
    }
    Ok((fixture, awkward, wnid))
}

/// Records whose bytes are not those of any clean source image.
fn not_from_sources<'a>(fixture: &ImageNetFixture, records: &'a [Record]) -> Vec<&'a Record> {
    let clean: std::collections::HashSet<&[u8]> =
        fixture.images.iter().map(|i| &i.bytes[..]).collect();
    records
        .iter()
        .filter(|r| !clean.contains(&r.data[..]))
        .collect()
}

/// A stored record must be a clean 3-channel baseline JPEG of the size its index says.
fn assert_clean_jpeg(rec: &Record) -> Result<()> {
    let info = jpeg::parse_header(&rec.data)
        .map_err(|e| anyhow::anyhow!("stored record does not parse: {e}"))?;
    ensure!(
        info.process == Process::Baseline,
        "not baseline: {:?}",
        info.process
    );
    ensure!(info.components == 3, "{} components", info.components);
    ensure!(
        (info.width, info.height) == (rec.width, rec.height),
        "header size differs from the index"
    );
    let decoded = image::load_from_memory_with_format(&rec.data, image::ImageFormat::Jpeg)?;
    ensure!(
        decoded.color() == image::ColorType::Rgb8,
        "decodes as {:?}",
        decoded.color()
    );
    ensure!((decoded.width(), decoded.height()) == (rec.width, rec.height));
    // And the packer itself would keep it as it is.
    ensure!(
        sanitize(&rec.data, &SanitizeOptions::default())
            == Outcome::Kept {
                width: rec.width,
                height: rec.height
            },
        "a stored record is not clean"
    );
    Ok(())
}

/// The report's per-split counts add up.
fn check_counts(report: &serde_json::Value, ds: &Dataset) -> Result<()> {
    for (split, s) in report["splits"].as_object().context("splits")? {
        let n = |k: &str| {
            s[k].as_u64()
                .unwrap_or_else(|| panic!("{split}.{k} missing in {s}"))
        };
        ensure!(
            n("kept") + n("reencoded") + n("skipped") + n("rejected") == n("inputs"),
            "{split}: counts do not add up: {s}"
        );
        ensure!(
            n("records") == n("kept") + n("reencoded"),
            "{split}: records != kept + reencoded: {s}"
        );
        ensure!(
            n("records") == ds.manifest().splits[split].records,
            "{split}: report and manifest disagree"
        );
    }
    Ok(())
}

/// The report entry for `name` in `train/<wnid>/`: (action, reason).
fn entry_for(
    files: &[(String, String, String, String)],
    wnid: &str,
    name: &str,
) -> Result<(String, String)> {
    let found: Vec<_> = files
        .iter()
        .filter(|(_, source, _, _)| source.ends_with(name) && source.contains(wnid))
        .collect();
    ensure!(
        found.len() == 1,
        "{name}: {} report entries in {files:?}",
        found.len()
    );
    let (split, _, action, reason) = found[0];
    ensure!(split == "train", "{name} reported in split {split}");
    Ok((action.clone(), reason.clone()))
}

#[test]
fn awkward_files_are_reencoded_and_broken_ones_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (fixture, awkward, wnid) = fixture_with_awkward(&tmp.path().join("imagenet"))?;
    let out = tmp.path().join("packed");
    let start = Instant::now();
    pack_shards(&fixture.root, &out, 2, 1, &[])?;
    let elapsed = start.elapsed();
    // The bomb (60000x60000) is refused from its header: decoding it would take minutes
    // and about 10 GB.
    assert!(elapsed < Duration::from_secs(30), "pack took {elapsed:?}");
    if let Some(kib) = peak_rss_kib() {
        assert!(kib < 2 << 20, "peak memory {} MiB", kib >> 10);
    }

    let ds = Dataset::open(&out)?;
    let label = fixture.label_of(&wnid);
    let train = read_all(&ds, "train")?;
    let reencoded_expected: Vec<&AwkwardFile> = awkward
        .iter()
        .filter(|a| matches!(a.expect, Expect::Reencoded { .. }))
        .collect();
    assert_eq!(
        train.len(),
        fixture.split("train").len() + reencoded_expected.len()
    );

    // Clean files are stored as they are (checked in detail in pack_imagenet.rs);
    // each awkward file is stored once, re-encoded, at its own size.
    let new = not_from_sources(&fixture, &train);
    assert_eq!(
        new.len(),
        reencoded_expected.len(),
        "records not from a clean source"
    );
    let mut by_size: HashMap<(u32, u32), &AwkwardFile> = HashMap::new();
    for a in &reencoded_expected {
        if let Expect::Reencoded { width, height } = a.expect {
            by_size.insert((width, height), a);
        }
    }
    for rec in new {
        let a = by_size
            .remove(&(rec.width, rec.height))
            .with_context(|| format!("unexpected record {}x{}", rec.width, rec.height))?;
        assert_eq!(rec.label, label, "{}", a.name);
        assert_ne!(&rec.data[..], &a.bytes[..], "{} stored as is", a.name);
        assert_clean_jpeg(rec).with_context(|| a.name.clone())?;
    }
    for rec in &train {
        assert_clean_jpeg(rec)?;
    }

    // Every awkward or broken file is in the report, with its action and reason; no
    // clean file is.
    let report = read_report(&out)?;
    let files = report_files(&report);
    assert_eq!(files.len(), awkward.len(), "{files:#?}");
    for a in &awkward {
        let (action, reason) = entry_for(&files, &wnid, &a.name)?;
        let want = match a.expect {
            Expect::Reencoded { .. } => "reencoded",
            Expect::Rejected => "rejected",
        };
        assert_eq!(action, want, "{}: {reason}", a.name);
        assert!(
            reason.to_lowercase().contains(a.reason),
            "{}: reason '{reason}' lacks '{}'",
            a.name,
            a.reason
        );
    }
    let (_, bomb_reason) = entry_for(&files, &wnid, "bomb.JPEG")?;
    assert!(bomb_reason.contains("60000x60000"), "{bomb_reason}");

    let train_report = &report["splits"]["train"];
    assert_eq!(train_report["inputs"], 12 + 8);
    assert_eq!(train_report["kept"], 12);
    assert_eq!(train_report["reencoded"], 4);
    assert_eq!(train_report["rejected"], 4);
    assert_eq!(train_report["skipped"], 0);
    check_counts(&report, &ds)?;
    Ok(())
}

#[test]
fn skip_policy_leaves_awkward_files_out_and_reports_them() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (fixture, awkward, wnid) = fixture_with_awkward(&tmp.path().join("imagenet"))?;
    let out = tmp.path().join("packed");
    pack_shards(&fixture.root, &out, 2, 1, &["--awkward", "skip"])?;
    let ds = Dataset::open(&out)?;
    let train = read_all(&ds, "train")?;
    assert_eq!(train.len(), fixture.split("train").len());
    assert!(
        not_from_sources(&fixture, &train).is_empty(),
        "only clean sources are stored"
    );

    let report = read_report(&out)?;
    let files = report_files(&report);
    assert_eq!(files.len(), awkward.len(), "{files:#?}");
    for a in &awkward {
        let (action, reason) = entry_for(&files, &wnid, &a.name)?;
        let want = match a.expect {
            Expect::Reencoded { .. } => "skipped",
            Expect::Rejected => "rejected",
        };
        assert_eq!(action, want, "{}: {reason}", a.name);
        assert!(
            reason.to_lowercase().contains(a.reason),
            "{}: reason '{reason}' lacks '{}'",
            a.name,
            a.reason
        );
    }
    assert_eq!(report["splits"]["train"]["skipped"], 4);
    assert_eq!(report["splits"]["train"]["rejected"], 4);
    check_counts(&report, &ds)?;
    Ok(())
}

#[test]
fn strict_fails_naming_the_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Only one broken file: the error must name it.
    let spec = ImageNetSpec {
        classes: 2,
        train_per_class: 3,
        val_per_class: 1,
        ..Default::default()
    };
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &spec)?;
    let wnid = &fixture.wnids[0];
    fixture.add_file(
        &format!("train/{wnid}/broken_one.JPEG"),
        &truncated_jpeg(64, 48, 9),
    )?;
    let out = tmp.path().join("packed");
    let msg = expect_err(
        pack_shards(&fixture.root, &out, 2, 1, &["--strict"]),
        &["broken_one.JPEG"],
    )?;
    assert!(msg.to_lowercase().contains("truncated"), "{msg}");
    assert!(
        !out.join("manifest.json").exists(),
        "a failed pack must not leave a manifest"
    );

    // With every kind of file: it fails on one of the files that cannot be stored.
    let tmp2 = tempfile::tempdir()?;
    let (fixture, awkward, _) = fixture_with_awkward(&tmp2.path().join("imagenet"))?;
    let out = tmp2.path().join("packed");
    let msg = message(&pack_shards(&fixture.root, &out, 2, 1, &["--strict"]).unwrap_err());
    let broken: Vec<&str> = awkward
        .iter()
        .filter(|a| a.expect == Expect::Rejected)
        .map(|a| a.name.as_str())
        .collect();
    assert!(
        broken.iter().any(|n| msg.contains(n)),
        "'{msg}' names none of {broken:?}"
    );
    assert!(!out.join("manifest.json").exists());

    // Re-encodable files alone do not make --strict fail.
    let tmp3 = tempfile::tempdir()?;
    let fixture = make_imagenet(&tmp3.path().join("imagenet"), &spec)?;
    fixture.add_file(
        &format!("train/{wnid}/gray.JPEG"),
        &grayscale_jpeg(50, 40, 3),
    )?;
    let out = tmp3.path().join("packed");
    pack_shards(&fixture.root, &out, 2, 1, &["--strict"])?;
    assert_eq!(Dataset::open(&out)?.manifest().splits["train"].records, 7);
    Ok(())
}

#[test]
fn max_side_downscales_large_images() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let spec = ImageNetSpec {
        classes: 3,
        train_per_class: 5,
        val_per_class: 2,
        ..Default::default()
    };
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &spec)?;
    let out = tmp.path().join("packed");
    pack_shards(&fixture.root, &out, 2, 1, &["--max-side", "64"])?;
    let ds = Dataset::open(&out)?;
    let report = read_report(&out)?;
    let files = report_files(&report);
    check_counts(&report, &ds)?;

    let mut resized = 0;
    let (mut n_small, mut n_large) = (0, 0);
    for split in ["train", "val"] {
        let records = read_all(&ds, split)?;
        let sources = fixture.split(split);
        let small: Vec<&&SourceImage> = sources
            .iter()
            .filter(|s| s.width.max(s.height) <= 64)
            .collect();
        let mut large: Vec<&&SourceImage> = sources
            .iter()
            .filter(|s| s.width.max(s.height) > 64)
            .collect();
        (n_small, n_large) = (n_small + small.len(), n_large + large.len());
        // Small images are kept byte-identical.
        for s in &small {
            let n = records.iter().filter(|r| r.data[..] == s.bytes[..]).count();
            assert_eq!(n, 1, "{} stored {n} times", s.rel);
            assert!(!files.iter().any(|f| f.1 == s.rel), "{} reported", s.rel);
        }
        // Large ones are re-encoded with the long side 64, aspect kept, and reported.
        let new = not_from_sources(&fixture, &records);
        assert_eq!(new.len(), large.len(), "{split}");
        for rec in new {
            assert_eq!(
                rec.width.max(rec.height),
                64,
                "{}x{}",
                rec.width,
                rec.height
            );
            assert_clean_jpeg(rec)?;
            let pos = large
                .iter()
                .position(|s| {
                    let long_is_width = s.width >= s.height;
                    let (long, short) = if long_is_width {
                        (s.width, s.height)
                    } else {
                        (s.height, s.width)
                    };
                    let want_short = (short as f64 * 64.0 / long as f64).round() as i64;
                    let (got_long, got_short) = if long_is_width {
                        (rec.width, rec.height)
                    } else {
                        (rec.height, rec.width)
                    };
                    s.label == rec.label
                        && got_long == 64
                        && (i64::from(got_short) - want_short).abs() <= 1
                })
                .with_context(|| {
                    format!(
                        "{split}: no source for a {}x{} record",
                        rec.width, rec.height
                    )
                })?;
            let s = large.remove(pos);
            let (_, _, action, reason) = files
                .iter()
                .find(|f| f.1 == s.rel)
                .with_context(|| format!("{} not in the report", s.rel))?;
            assert_eq!(action, "reencoded");
            assert!(reason.contains("64"), "{reason}");
            resized += 1;
        }
    }
    assert!(
        n_small > 0 && n_large > 0,
        "the fixture has images on both sides of 64 px"
    );
    assert_eq!(
        report["splits"]["train"]["reencoded"].as_u64().unwrap()
            + report["splits"]["val"]["reencoded"].as_u64().unwrap(),
        resized
    );
    Ok(())
}

#[test]
fn unlabelled_and_stray_files_are_reported() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let spec = ImageNetSpec {
        classes: 2,
        train_per_class: 3,
        val_per_class: 2,
        ..Default::default()
    };
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &spec)?;
    // A file outside the class folders, a val image the labels file does not know, and
    // an awkward val image that it does.
    fixture.add_file("train/stray.JPEG", &baseline_jpeg(50, 50, 77))?;
    fixture.add_file(
        "val/ILSVRC2012_val_99999999.JPEG",
        &baseline_jpeg(52, 48, 78),
    )?;
    fixture.add_file("val/ILSVRC2012_val_99999998.JPEG", &cmyk_jpeg(44, 40, 79))?;
    let csv = fixture.root.join("LOC_val_solution.csv");
    let mut text = std::fs::read_to_string(&csv)?;
    text.push_str(&format!(
        "ILSVRC2012_val_99999998,{} 1 2 3 4\n",
        fixture.wnids[1]
    ));
    std::fs::write(&csv, text)?;

    let out = tmp.path().join("packed");
    pack_shards(&fixture.root, &out, 2, 1, &[])?;
    let ds = Dataset::open(&out)?;
    let report = read_report(&out)?;
    check_counts(&report, &ds)?;
    let files = report_files(&report);
    let find = |name: &str| files.iter().find(|f| f.1.ends_with(name)).cloned();
    let stray = find("stray.JPEG").context("stray file reported")?;
    assert_eq!((stray.0.as_str(), stray.2.as_str()), ("train", "rejected"));
    let unlabelled = find("ILSVRC2012_val_99999999.JPEG").context("unlabelled file reported")?;
    assert_eq!(
        (unlabelled.0.as_str(), unlabelled.2.as_str()),
        ("val", "rejected")
    );
    assert!(unlabelled.3.contains("label"), "{}", unlabelled.3);
    let cmyk = find("ILSVRC2012_val_99999998.JPEG").context("CMYK val file reported")?;
    assert_eq!((cmyk.0.as_str(), cmyk.2.as_str()), ("val", "reencoded"));

    let val = read_all(&ds, "val")?;
    assert_eq!(val.len(), fixture.split("val").len() + 1);
    let new = not_from_sources(&fixture, &val);
    assert_eq!(new.len(), 1);
    assert_eq!((new[0].label, new[0].width, new[0].height), (1, 44, 40));
    assert_clean_jpeg(new[0])?;
    assert_eq!(report["splits"]["train"]["inputs"], 7);
    assert_eq!(report["splits"]["val"]["inputs"], 4 + 2);
    Ok(())
}
