//! Resuming an interrupted `pack-imagenet`: finished shards are kept untouched, missing
//! or unfinished ones are rebuilt, and the result is byte-identical to an uninterrupted
//! pack. Resuming with other options is refused without changing anything.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Result;
use common::*;
use convnets_formats::Dataset;

/// A folder with clean images plus every awkward file, so the report has content.
fn make_fixture(root: &Path) -> Result<(ImageNetFixture, Vec<AwkwardFile>)> {
    let spec = ImageNetSpec {
        classes: 3,
        train_per_class: 5,
        val_per_class: 2,
        ..Default::default()
    };
    let fixture = make_imagenet(root, &spec)?;
    let awkward = awkward_files();
    for (i, a) in awkward.iter().enumerate() {
        let wnid = &fixture.wnids[i % fixture.wnids.len()];
        fixture.add_file(&format!("train/{wnid}/{}", a.name), &a.bytes)?;
    }
    Ok((fixture, awkward))
}

/// (inode, mtime) of each file directly in `dir`.
fn identities(dir: &Path) -> Result<BTreeMap<String, (u64, SystemTime)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() {
            out.insert(
                entry.file_name().to_string_lossy().into_owned(),
                (meta.ino(), meta.modified()?),
            );
        }
    }
    Ok(out)
}

/// Path -> (bytes, inode, mtime).
type Snapshot = BTreeMap<String, (Vec<u8>, u64, SystemTime)>;

/// Every file under `dir` (recursively), with its bytes, inode and mtime.
fn snapshot(dir: &Path) -> Result<Snapshot> {
    fn walk(dir: &Path, prefix: &str, out: &mut Snapshot) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(&entry.path(), &format!("{name}/"), out)?;
            } else {
                out.insert(
                    name,
                    (std::fs::read(entry.path())?, meta.ino(), meta.modified()?),
                );
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, "", &mut out)?;
    Ok(out)
}

/// Shards and manifest byte-identical; the report identical but for `resumed_shards`,
/// which says how the output was made.
fn assert_same_output(a: &Path, b: &Path) -> Result<()> {
    let (fa, fb) = (files_of(a)?, files_of(b)?);
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fa), names(&fb));
    for ((name, da), (_, db)) in fa.iter().zip(&fb) {
        if name != "pack-report.json" {
            assert!(da == db, "{name} differs from the uninterrupted pack");
        }
    }
    let report = |dir: &Path| -> Result<serde_json::Value> {
        let mut r = read_report(dir)?;
        for s in r["splits"].as_object_mut().unwrap().values_mut() {
            s.as_object_mut().unwrap().remove("resumed_shards");
        }
        Ok(r)
    };
    assert_eq!(report(a)?, report(b)?, "pack reports differ");
    Ok(())
}

const ARGS: [&str; 2] = ["--seed", "3"];

#[test]
fn a_deleted_shard_is_rebuilt_and_the_others_are_untouched() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (fixture, awkward) = make_fixture(&tmp.path().join("imagenet"))?;
    let (reference, out) = (tmp.path().join("reference"), tmp.path().join("out"));
    pack_shards(&fixture.root, &reference, 3, 2, &ARGS)?;
    pack_shards(&fixture.root, &out, 3, 2, &ARGS)?;
    assert_same_output(&reference, &out)?;

    let shards = shard_files(&out)?;
    assert_eq!(shards.len(), 5, "{shards:?}");
    let victim = shards
        .iter()
        .find(|n| n.starts_with("train"))
        .unwrap()
        .clone();
    let before = identities(&out)?;
    // Make sure a rewrite would show in the mtime even on coarse-grained filesystems.
    std::thread::sleep(std::time::Duration::from_millis(20));

    // Simulate a crash while the shard was being written: gone, with a partial temp file.
    std::fs::remove_file(out.join(&victim))?;
    std::fs::write(
        out.join(format!("{victim}.tmp")),
        b"CNVSHARD partial garbage",
    )?;
    pack_shards(&fixture.root, &out, 3, 2, &ARGS)?;

    assert!(out.join(&victim).is_file(), "{victim} was not rebuilt");
    assert!(
        !out.join(format!("{victim}.tmp")).exists(),
        "temp file left behind"
    );
    let after = identities(&out)?;
    for name in &shards {
        if *name != victim {
            assert_eq!(before[name], after[name], "{name} was rewritten");
        }
    }
    assert_same_output(&reference, &out)?;

    // The report still names every awkward file (those in finished shards included).
    let report = read_report(&out)?;
    let files = report_files(&report);
    for a in &awkward {
        assert!(
            files.iter().any(|f| f.1.ends_with(&a.name)),
            "{} missing from the report",
            a.name
        );
    }
    assert_eq!(files.len(), awkward.len());
    assert_eq!(report["splits"]["train"]["resumed_shards"], 2);
    assert_eq!(report["splits"]["val"]["resumed_shards"], 2);
    let ds = Dataset::open(&out)?;
    assert_eq!(ds.manifest(), Dataset::open(&reference)?.manifest());
    convnets(&["verify", out.to_str().unwrap()])?;
    Ok(())
}

#[test]
fn an_unfinished_or_damaged_shard_is_rebuilt() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (fixture, _) = make_fixture(&tmp.path().join("imagenet"))?;
    let (reference, out) = (tmp.path().join("reference"), tmp.path().join("out"));
    pack_shards(&fixture.root, &reference, 3, 2, &ARGS)?;
    pack_shards(&fixture.root, &out, 3, 2, &ARGS)?;

    // Crash before the manifest was written, with one shard cut short and one val shard
    // never started.
    let shards = shard_files(&out)?;
    let train = shards.iter().find(|n| n.starts_with("train")).unwrap();
    let val = shards.iter().rev().find(|n| n.starts_with("val")).unwrap();
    let bytes = std::fs::read(out.join(train))?;
    std::fs::write(out.join(train), &bytes[..bytes.len() / 2])?;
    std::fs::remove_file(out.join(val))?;
    // And one finished shard damaged in place since (same size, one bit of image data).
    let damaged = shards
        .iter()
        .filter(|n| n.starts_with("train"))
        .nth(1)
        .unwrap();
    flip_bit(&out.join(damaged), 100, 3)?;
    std::fs::remove_file(out.join("manifest.json"))?;
    std::fs::remove_file(out.join("pack-report.json"))?;

    pack_shards(&fixture.root, &out, 3, 2, &ARGS)?;
    assert_same_output(&reference, &out)?;
    let report = read_report(&out)?;
    assert_eq!(report["splits"]["train"]["resumed_shards"], 1);
    assert_eq!(report["splits"]["val"]["resumed_shards"], 1);
    Ok(())
}

#[test]
fn resuming_with_other_options_is_refused_and_changes_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (fixture, _) = make_fixture(&tmp.path().join("imagenet"))?;
    let out = tmp.path().join("out");
    pack_shards(&fixture.root, &out, 3, 2, &ARGS)?;
    // Interrupted: one shard missing.
    let victim = shard_files(&out)?.into_iter().next().unwrap();
    std::fs::remove_file(out.join(&victim))?;
    let before = snapshot(&out)?;

    let attempts: [(usize, usize, &[&str]); 4] = [
        (3, 2, &["--seed", "4"]),
        (4, 2, &ARGS),
        (3, 2, &["--seed", "3", "--max-side", "64"]),
        (3, 2, &["--seed", "3", "--awkward", "skip"]),
    ];
    for (train, val, args) in attempts {
        let msg = expect_err(
            pack_shards(&fixture.root, &out, train, val, args),
            &[out.to_str().unwrap()],
        )?;
        assert!(msg.contains("other input or options"), "{args:?}: {msg}");
        assert!(
            before == snapshot(&out)?,
            "{args:?}: the output folder changed"
        );
    }
    // Other input: another folder with the same layout.
    let (other, _) = make_fixture(&tmp.path().join("other"))?;
    expect_err(
        pack_shards(&other.root, &out, 3, 2, &ARGS),
        &["other input or options"],
    )?;
    assert!(before == snapshot(&out)?, "the output folder changed");

    // The original command still finishes the job.
    pack_shards(&fixture.root, &out, 3, 2, &ARGS)?;
    assert!(out.join(&victim).is_file());
    Ok(())
}

#[test]
fn packing_into_a_foreign_folder_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (fixture, _) = make_fixture(&tmp.path().join("imagenet"))?;
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("precious.txt"), b"do not touch")?;
    expect_err(
        pack_shards(&fixture.root, &out, 3, 2, &ARGS),
        &["not empty"],
    )?;
    assert_eq!(std::fs::read(out.join("precious.txt"))?, b"do not touch");
    assert_eq!(files_of(&out)?.len(), 1);
    Ok(())
}

#[test]
fn rerunning_a_finished_pack_rewrites_no_shard() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (fixture, _) = make_fixture(&tmp.path().join("imagenet"))?;
    let out = tmp.path().join("out");
    pack_shards(&fixture.root, &out, 3, 2, &ARGS)?;
    let before = identities(&out)?;
    let bytes_before = files_of(&out)?;
    std::thread::sleep(std::time::Duration::from_millis(20));
    pack_shards(&fixture.root, &out, 3, 2, &ARGS)?;
    let after = identities(&out)?;
    for name in shard_files(&out)? {
        assert_eq!(before[&name], after[&name], "{name} was rewritten");
    }
    let report = read_report(&out)?;
    assert_eq!(report["splits"]["train"]["resumed_shards"], 3);
    assert_eq!(report["splits"]["val"]["resumed_shards"], 2);
    let bytes_after = files_of(&out)?;
    for ((name, a), (_, b)) in bytes_before.iter().zip(&bytes_after) {
        if name != "pack-report.json" {
            assert!(a == b, "{name} changed");
        }
    }
    Ok(())
}
