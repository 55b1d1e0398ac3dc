//! `pack-imagenet` on input that is wrong in ways other than its images: empty class
//! folders, the output inside the input, folder links that loop, names that are not UTF-8,
//! a second packer on the same output, and errors that must leave nothing behind.

mod common;

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{ensure, Result};
use common::*;
use convnets_formats::Dataset;

fn fixture(root: &Path) -> Result<ImageNetFixture> {
    make_imagenet(
        root,
        &ImageNetSpec {
            classes: 3,
            train_per_class: 3,
            val_per_class: 1,
            ..Default::default()
        },
    )
}

fn wnids(out: &Path) -> Result<Vec<String>> {
    let ds = Dataset::open(out)?;
    Ok(ds
        .manifest()
        .classes
        .iter()
        .map(|c| c.wnid.clone())
        .collect())
}

#[test]
fn empty_class_folders_are_refused_by_name_and_nothing_is_written() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = fixture(&tmp.path().join("in"))?;
    let train = fixture.root.join("train");
    std::fs::create_dir(train.join("n09999999"))?;
    // Images only in a sub-folder: not read, so no images either.
    fixture.add_file("train/n09999998/nested/a.JPEG", &baseline_jpeg(32, 32, 1))?;
    // A name that is not UTF-8 is shown escaped.
    std::fs::create_dir(train.join(OsStr::from_bytes(b"n0999999\xE9")))?;
    let out = tmp.path().join("out");
    expect_err(
        pack(&fixture.root, &out, &[]),
        &[
            "n09999998",
            "n09999999",
            "n0999999\\xE9",
            "no image files",
            "3 such folders",
        ],
    )?;
    ensure!(!out.exists(), "a refused pack leaves no output folder");
    Ok(())
}

#[test]
fn the_output_folder_inside_the_input_is_never_read() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = fixture(&tmp.path().join("in"))?;
    let out = fixture.root.join("train").join("packed");
    pack(&fixture.root, &out, &[])?;
    ensure!(wnids(&out)? == fixture.wnids, "{:?}", wnids(&out)?);
    // Again, now that the output holds shards: still not a class, and nothing rebuilt.
    pack(&fixture.root, &out, &[])?;
    ensure!(wnids(&out)? == fixture.wnids);
    let ds = Dataset::open(&out)?;
    ensure!(ds.manifest().splits["train"].records == 9);
    Ok(())
}

#[test]
fn a_class_folder_linking_back_up_is_refused_without_hanging() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = fixture(&tmp.path().join("in"))?;
    let train = fixture.root.join("train");
    std::os::unix::fs::symlink(&train, train.join("n09999999"))?;
    let out = tmp.path().join("out");
    expect_err(pack(&fixture.root, &out, &[]), &["n09999999", "loop"])?;
    ensure!(!out.exists());
    std::fs::remove_file(train.join("n09999999"))?;
    std::os::unix::fs::symlink(&fixture.root, train.join("n00000000"))?;
    expect_err(pack(&fixture.root, &out, &[]), &["n00000000", "loop"])?;
    // A link to a real class folder elsewhere is an ordinary class.
    std::fs::remove_file(train.join("n00000000"))?;
    let elsewhere = tmp.path().join("n09999999");
    std::fs::create_dir(&elsewhere)?;
    std::fs::write(elsewhere.join("x.JPEG"), baseline_jpeg(40, 30, 2))?;
    std::os::unix::fs::symlink(&elsewhere, train.join("n09999999"))?;
    pack(&fixture.root, &out, &[])?;
    ensure!(wnids(&out)?.last().map(String::as_str) == Some("n09999999"));
    Ok(())
}

#[test]
fn names_that_are_not_utf8_are_read_and_reported_distinctly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = fixture(&tmp.path().join("in"))?;
    let class = fixture.root.join("train").join(&fixture.wnids[0]);
    // Two PNGs (re-encoded, so reported) whose names differ only in a non-UTF-8 byte.
    std::fs::write(
        class.join(OsStr::from_bytes(b"caf\xE9.JPEG")),
        png(30, 20, 1),
    )?;
    std::fs::write(
        class.join(OsStr::from_bytes(b"caf\xE8.JPEG")),
        png(30, 20, 2),
    )?;
    // A class folder whose name is not UTF-8.
    let odd_class = fixture
        .root
        .join("train")
        .join(OsStr::from_bytes(b"n1\xFF"));
    std::fs::create_dir(&odd_class)?;
    std::fs::write(odd_class.join("a.JPEG"), baseline_jpeg(40, 30, 3))?;
    let out = tmp.path().join("out");
    pack(&fixture.root, &out, &[])?;

    let report = read_report(&out)?;
    let sources: Vec<String> = report_files(&report)
        .into_iter()
        .map(|(_, source, _, _)| source)
        .collect();
    let w = &fixture.wnids[0];
    for want in [
        format!("train/{w}/caf\\xE9.JPEG"),
        format!("train/{w}/caf\\xE8.JPEG"),
    ] {
        ensure!(sources.contains(&want), "{want} not in {sources:?}");
    }
    ensure!(wnids(&out)?.contains(&"n1\\xFF".to_string()));
    let ds = Dataset::open(&out)?;
    ensure!(ds.manifest().splits["train"].records == 9 + 3);
    Ok(())
}

#[test]
fn a_live_packer_holds_its_output_folder() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = fixture(&tmp.path().join("in"))?;
    let out = tmp.path().join("out");
    pack(&fixture.root, &out, &[])?;
    let lock_path = out.join(".pack").join("lock");
    std::fs::write(&lock_path, "4242")?;
    let lock = std::fs::File::open(&lock_path)?;
    // SAFETY: flock on a descriptor this test owns.
    ensure!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0);
    expect_err(
        pack(&fixture.root, &out, &[]),
        &["in use by PID 4242", "out"],
    )?;
    // Once the holder is gone (a dead process's lock goes with it), the folder is free.
    drop(lock);
    pack(&fixture.root, &out, &[])?;
    Ok(())
}

#[test]
fn errors_leave_nothing_behind() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = fixture(&tmp.path().join("in"))?;
    let out = tmp.path().join("out");

    // An input that is a file is called one.
    let file = tmp.path().join("imagenet.tar");
    std::fs::write(&file, b"not a folder")?;
    let msg = expect_err(pack(&file, &out, &[]), &["imagenet.tar", "is a file"])?;
    ensure!(!msg.contains("does not exist"), "{msg}");
    ensure!(!out.exists());

    // A pack that fails on a file (--strict): no output folder.
    let bad = fixture.add_file(
        &format!("train/{}/cut.JPEG", fixture.wnids[1]),
        &truncated_jpeg(64, 48, 1),
    )?;
    expect_err(pack(&fixture.root, &out, &["--strict"]), &["cut.JPEG"])?;
    ensure!(!out.exists(), "a failed pack leaves no output folder");
    // Into a folder that existed: the folder stays, without a .pack/ inside.
    std::fs::create_dir(&out)?;
    expect_err(pack(&fixture.root, &out, &["--strict"]), &["cut.JPEG"])?;
    ensure!(
        std::fs::read_dir(&out)?.next().is_none(),
        "out is left empty"
    );
    std::fs::remove_file(bad)?;

    // The input folder itself as the output: refused, and no .pack/ made in the input.
    expect_err(pack(&fixture.root, &fixture.root, &[]), &["not empty"])?;
    ensure!(!fixture.root.join(".pack").exists());

    // The report cannot be put in place: no temporary file is left.
    pack(&fixture.root, &out, &[])?;
    std::fs::remove_file(out.join("manifest.json"))?;
    std::fs::remove_file(out.join("pack-report.json"))?;
    std::fs::create_dir(out.join("pack-report.json"))?;
    expect_err(pack(&fixture.root, &out, &[]), &["pack-report.json"])?;
    ensure!(!out.join("pack-report.json.tmp").exists());
    Ok(())
}
