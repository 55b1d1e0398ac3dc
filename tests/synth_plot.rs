//! `convnets synth` (a synthetic ImageNet-like folder: layout, valid baseline JPEGs,
//! determinism, refusal of a non-empty folder, packable) and `convnets plot` (training
//! curves from log.jsonl as a PNG).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use common::*;
use convnets_formats::jpeg::{chroma_subsampling, parse_header, Process, Subsampling};
use convnets_formats::Dataset;
use convnets_tools::synth::{generate, wnid, SynthOptions};

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Every file under `dir`, by path relative to it, with its bytes.
fn tree(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                let rel = entry
                    .path()
                    .strip_prefix(dir)?
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(entry.path())?);
            }
        }
    }
    Ok(out)
}

fn small(output: &Path, seed: u64) -> SynthOptions {
    SynthOptions {
        output: output.to_path_buf(),
        classes: 3,
        train_per_class: 5,
        val_per_class: 2,
        size: 48,
        seed,
        ..Default::default()
    }
}

#[test]
fn synth_writes_an_imagenet_like_folder() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("synth");
    convnets(&[
        "synth",
        "-o",
        root.to_str().context("utf-8 path")?,
        "--classes",
        "3",
        "--train-per-class",
        "5",
        "--val-per-class",
        "2",
        "--size",
        "48",
        "--seed",
        "3",
    ])?;

    let files = tree(&root)?;
    let wnids: Vec<String> = (0..3).map(wnid).collect();
    assert_eq!(wnids, ["n90000000", "n90000001", "n90000002"]);
    let mut sizes = std::collections::HashSet::new();
    for w in &wnids {
        for (split, count) in [("train", 5), ("val", 2)] {
            let prefix = format!("{split}/{w}/");
            let in_class: Vec<_> = files
                .iter()
                .filter(|(p, _)| p.starts_with(&prefix))
                .collect();
            ensure!(
                in_class.len() == count,
                "{prefix}: {} files",
                in_class.len()
            );
            for (path, bytes) in in_class {
                ensure!(path.ends_with(".JPEG"), "{path}");
                let info = parse_header(bytes).with_context(|| path.clone())?;
                ensure!(
                    matches!(info.process, Process::Baseline),
                    "{path}: {:?}",
                    info.process
                );
                ensure!(
                    chroma_subsampling(&info) == Subsampling::S420,
                    "{path}: not 4:2:0"
                );
                ensure!(
                    (36..=60).contains(&info.width) && (36..=60).contains(&info.height),
                    "{path}: {}x{}",
                    info.width,
                    info.height
                );
                let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
                    .with_context(|| format!("decoding {path}"))?;
                ensure!(
                    (img.width(), img.height()) == (info.width, info.height),
                    "{path}"
                );
                sizes.insert((info.width, info.height));
            }
        }
    }
    ensure!(files.len() == 3 * 7 + 1, "{} files", files.len());
    ensure!(sizes.len() > 10, "image sizes barely vary: {sizes:?}");

    let mapping = String::from_utf8(files["LOC_synset_mapping.txt"].clone())?;
    let lines: Vec<&str> = mapping.lines().collect();
    ensure!(lines.len() == 3, "{mapping}");
    for (line, w) in lines.iter().zip(&wnids) {
        let (got, name) = line.split_once(' ').context("wnid and name")?;
        ensure!(got == w && !name.trim().is_empty(), "{line}");
    }
    Ok(())
}

#[test]
fn synth_is_deterministic_per_seed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let summary = generate(&small(&a, 11))?;
    assert_eq!((summary.train_images, summary.val_images), (15, 6));
    generate(&small(&b, 11))?;
    generate(&small(&c, 12))?;
    let (ta, tb, tc) = (tree(&a)?, tree(&b)?, tree(&c)?);
    ensure!(ta == tb, "same seed, different files");
    ensure!(ta.keys().eq(tc.keys()), "another seed changed the layout");
    let same = ta.iter().filter(|(k, v)| tc[*k] == **v).count();
    ensure!(
        same == 1,
        "another seed left {same} files identical (only the mapping should be)"
    );
    // Every image differs from every other.
    let distinct: std::collections::HashSet<&Vec<u8>> = ta.values().collect();
    ensure!(distinct.len() == ta.len(), "duplicate images");
    Ok(())
}

#[test]
fn synth_refuses_a_non_empty_folder() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::write(tmp.path().join("keep.txt"), b"mine")?;
    let out = tmp.path().to_str().context("utf-8 path")?;
    expect_err(
        convnets(&["synth", "-o", out, "--classes", "2"]),
        &["not empty", out],
    )?;
    ensure!(tree(tmp.path())?.len() == 1, "something was written");
    // An existing empty folder is fine.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty)?;
    generate(&SynthOptions {
        classes: 1,
        train_per_class: 1,
        val_per_class: 0,
        ..small(&empty, 0)
    })?;
    ensure!(tree(&empty)?.len() == 2);
    Ok(())
}

#[test]
fn synth_output_packs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (src, packed) = (tmp.path().join("synth"), tmp.path().join("packed"));
    let summary = generate(&small(&src, 5))?;
    pack(&src, &packed, &[])?;
    let ds = Dataset::open(&packed)?;
    let classes = &ds.manifest().classes;
    ensure!(
        classes.iter().map(|c| &c.wnid).eq(summary.wnids.iter()),
        "wnids"
    );
    ensure!(
        classes.iter().map(|c| &c.name).eq(summary.names.iter()),
        "names from the mapping"
    );
    for (split, n, per_class) in [("train", 15, 5), ("val", 6, 2)] {
        let records = read_all(&ds, split)?;
        ensure!(records.len() == n, "{split}: {} records", records.len());
        for label in 0..3 {
            let count = records.iter().filter(|r| r.label == label).count();
            ensure!(count == per_class, "{split} label {label}: {count}");
        }
    }
    // Clean baseline JPEGs are stored as they are.
    let report = read_report(&packed)?;
    for split in ["train", "val"] {
        ensure!(
            report["splits"][split]["reencoded"] == 0 && report["splits"][split]["rejected"] == 0,
            "{report}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// plot

fn write_log(dir: &Path, eval: bool) -> Result<()> {
    let mut log = String::from("{\"type\":\"meta\",\"arch\":\"resnet18\",\"note\":\"ignored\"}\n");
    let mut step = 0;
    for epoch in 0..4 {
        for _ in 0..10 {
            step += 1;
            let loss = 2.3 / (1.0 + step as f64 / 10.0);
            log.push_str(&format!(
                "{{\"type\":\"train\",\"epoch\":{epoch},\"step\":{step},\"loss\":{loss},\"lr\":0.1,\"img_s\":{},\"loss_scale\":65536}}\n",
                900 + (step * 37) % 100
            ));
        }
        if eval {
            log.push_str(&format!(
                "{{\"type\":\"eval\",\"epoch\":{epoch},\"step\":{step},\"loss\":{},\"top1\":{},\"top5\":{},\"images\":60}}\n",
                2.0 / (1.0 + epoch as f64),
                0.2 + 0.2 * epoch as f64,
                0.5 + 0.15 * epoch as f64
            ));
        }
    }
    std::fs::write(dir.join("log.jsonl"), log)?;
    Ok(())
}

/// Checks `path` is a plausible PNG of the expected chart and returns its size.
fn check_png(path: &Path) -> Result<(u32, u32)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(bytes.starts_with(PNG_SIGNATURE), "not a PNG");
    ensure!(
        (10_000..10_000_000).contains(&bytes.len()),
        "implausible PNG size {}",
        bytes.len()
    );
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)?.to_rgb8();
    ensure!(
        img.width() >= 600 && img.height() >= 600,
        "{}x{}",
        img.width(),
        img.height()
    );
    // Not blank: a white background with curves and text on it.
    let dark = img
        .pixels()
        .filter(|p| p.0.iter().all(|&c| c < 100))
        .count();
    let coloured = img.pixels().filter(|p| p.0[2] > 150 && p.0[0] < 80).count();
    ensure!(
        dark > 1000 && coloured > 500,
        "dark {dark}, blue {coloured}: curves or text missing"
    );
    ensure!(
        !std::fs::read_dir(path.parent().context("parent")?)?
            .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".tmp"))),
        "temp file left"
    );
    Ok((img.width(), img.height()))
}

#[test]
fn plot_draws_a_png() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_log(tmp.path(), true)?;
    convnets(&["plot".as_ref(), tmp.path().as_os_str()])?;
    check_png(&tmp.path().join("curves.png"))?;

    let other = tmp.path().join("other.png");
    convnets(&[
        "plot".as_ref(),
        tmp.path().as_os_str(),
        "--output".as_ref(),
        other.as_os_str(),
    ])?;
    check_png(&other)?;
    Ok(())
}

#[test]
fn plot_without_eval_records() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_log(tmp.path(), false)?;
    convnets(&["plot".as_ref(), tmp.path().as_os_str()])?;
    check_png(&tmp.path().join("curves.png"))?;
    Ok(())
}

#[test]
fn plot_names_a_malformed_line() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().as_os_str();
    let log = tmp.path().join("log.jsonl");
    std::fs::write(
        &log,
        "{\"type\":\"train\",\"epoch\":0,\"step\":1,\"loss\":2.0,\"img_s\":10}\n\n{\"type\":\"train\",\"step\":2,\"loss\n",
    )?;
    expect_err(convnets(&["plot".as_ref(), dir]), &["line 3", "log.jsonl"])?;
    std::fs::write(&log, "{\"type\":\"eval\",\"epoch\":0,\"top1\":\"high\"}\n")?;
    expect_err(convnets(&["plot".as_ref(), dir]), &["line 1", "top1"])?;
    std::fs::write(&log, "{\"type\":\"meta\"}\n")?;
    expect_err(
        convnets(&["plot".as_ref(), dir]),
        &["no train or eval records"],
    )?;
    ensure!(
        !tmp.path().join("curves.png").exists(),
        "a PNG was written for a bad log"
    );
    Ok(())
}
