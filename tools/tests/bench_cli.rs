//! `convnets bench` run as a user would: the reported numbers are consistent, and the e2e
//! verdict flips between input-bound and compute-bound on constructed cases.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
use convnets_formats::RecordSource;
use convnets_tools::bench_model::{e2e_measure, E2eBenchArgs};

fn convnets(args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_convnets"))
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "convnets {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn json(args: &[&str]) -> Result<serde_json::Value> {
    let mut all = args.to_vec();
    all.push("--json");
    Ok(serde_json::from_str(&convnets(&all)?)?)
}

/// A packed synthetic dataset whose images are `size` pixels on a side.
fn dataset(dir: &Path, size: u32, per_class: u32) -> Result<String> {
    let images = dir.join("images");
    let packed = dir.join("packed");
    convnets(&[
        "synth",
        "--output",
        images.to_str().unwrap(),
        "--classes",
        "2",
        "--train-per-class",
        &per_class.to_string(),
        "--val-per-class",
        "0",
        "--size",
        &size.to_string(),
    ])?;
    convnets(&[
        "pack-imagenet",
        "-i",
        images.to_str().unwrap(),
        "-o",
        packed.to_str().unwrap(),
        "-q",
        "--no-decode-check",
    ])?;
    Ok(packed.to_str().context("utf-8 path")?.to_string())
}

#[test]
fn loader_numbers_add_up() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = dataset(tmp.path(), 64, 20)?;
    let d = json(&[
        "bench",
        "loader",
        "--data",
        &data,
        "--batch-size",
        "4",
        "--threads",
        "2",
        "--image-size",
        "32",
        "--epochs",
        "3",
        "--warmup-batches",
        "2",
    ])?;
    let (images, batches) = (
        d["images"].as_u64().context("images")?,
        d["batches"].as_u64().context("batches")?,
    );
    assert_eq!(images, batches * 4, "images = batches x batch size");
    assert_eq!(
        batches,
        3 * 10 - 2,
        "three epochs of 10 batches, 2 of warm-up"
    );
    let wall = d["wall_s"].as_f64().context("wall")?;
    let threads = d["settings"]["threads"].as_f64().context("threads")?;
    let stages: f64 = ["read", "decode", "augment"]
        .iter()
        .map(|s| d["stage_thread_s"][s].as_f64().unwrap_or(-1.0))
        .sum();
    assert!(
        stages > 0.0 && stages <= wall * threads * 1.05,
        "stage time {stages} in {wall} s x {threads} threads"
    );
    let rate = d["images_per_s"].as_f64().context("rate")?;
    assert!((rate * wall - images as f64).abs() < 1.0);
    Ok(())
}

#[test]
fn drop_cache_evicts_the_split_and_reports_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = dataset(tmp.path(), 64, 10)?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&data).join("manifest.json"))?)?;
    let shards = manifest["splits"]["train"]["shards"]
        .as_array()
        .context("train shards")?;
    let shard_bytes: u64 = shards.iter().filter_map(|s| s["bytes"].as_u64()).sum();
    let args = [
        "bench",
        "loader",
        "--data",
        &data,
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--warmup-batches",
        "1",
    ];

    let d = json(&[&args[..], &["--drop-cache"]].concat())?;
    assert_eq!(d["settings"]["drop_cache"], true, "{d}");
    let dc = &d["drop_cache"];
    assert_eq!(dc["files"].as_u64(), Some(shards.len() as u64), "{d}");
    assert_eq!(dc["bytes"].as_u64(), Some(shard_bytes), "{d}");
    let after = dc["resident_after_bytes"]
        .as_u64()
        .context("resident after")?;
    let cold = d["cold"].as_bool().context("cold")?;
    let failed = dc["failed"].as_array().context("failed")?;
    assert_eq!(cold, failed.is_empty() && after == 0, "{d}");
    assert!(
        dc["resident_at_start_bytes"].as_u64().context("at start")? <= shard_bytes,
        "{d}"
    );
    assert!(d["images"].as_u64().unwrap_or(0) > 0, "{d}");
    // No root needed: on a disk file system the files leave the page cache (tmpfs pages cannot).
    if !on_tmpfs(tmp.path()) {
        assert!(cold, "eviction failed on a disk file system: {d}");
    }

    let d = json(&args)?;
    assert_eq!(d["cold"], false, "{d}");
    assert!(d["drop_cache"].is_null(), "{d}");
    Ok(())
}

/// Whether `path` lies on a tmpfs, whose pages are the files themselves.
fn on_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == TMPFS_MAGIC }
}

/// Records served `delay` late: a deliberately slow loader.
struct Slow(std::sync::Arc<dyn RecordSource>, std::time::Duration);

impl RecordSource for Slow {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn meta(&self, i: usize) -> convnets_formats::Result<convnets_formats::RecordMeta> {
        self.0.meta(i)
    }
    fn record(&self, i: usize) -> convnets_formats::Result<convnets_formats::Record> {
        std::thread::sleep(self.1);
        self.0.record(i)
    }
    fn locate(&self, i: usize) -> convnets_formats::Result<(std::path::PathBuf, u64)> {
        self.0.locate(i)
    }
}

#[test]
fn e2e_verdict_flips_between_input_and_compute_bound() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = dataset(tmp.path(), 48, 8)?;
    let source = convnets_tools::source::open_split(Path::new(&data), "train", 1)?;
    // One intra-op thread: libtorch's spinning workers slow down badly when other
    // processes share the cores, and the verdict must not depend on the machine's load.
    tch::set_num_threads(1);
    let args = |arch: &str, size: &str, batch: &str| -> Result<E2eBenchArgs> {
        let cli = Probe::try_parse_from([
            "probe",
            "--data",
            &data,
            "--arch",
            arch,
            "--batch-size",
            batch,
            "--image-size",
            size,
            "--threads",
            "1",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
            "--device",
            "cpu",
        ])?;
        Ok(cli.args)
    };
    // 300 ms per record on one thread (< 3.4 img/s) feeding resnet18 at 16x16 (hundreds of
    // img/s on one idle core): input-bound with a wide margin.
    let slow: std::sync::Arc<dyn RecordSource> =
        std::sync::Arc::new(Slow(source.clone(), std::time::Duration::from_millis(300)));
    let d = e2e_measure(slow, &args("resnet18", "16", "4")?)?;
    assert_eq!(d["input_bound"], true, "{d}");
    assert!(
        d["verdict"]
            .as_str()
            .unwrap_or("")
            .starts_with("input-bound"),
        "{d}"
    );
    assert!(d["data_wait_fraction"].as_f64().unwrap_or(0.0) > 0.2, "{d}");

    // The same records at full speed feeding resnet50 at 96x96: compute-bound.
    let d = e2e_measure(source, &args("resnet50", "96", "8")?)?;
    assert_eq!(d["input_bound"], false, "{d}");
    assert!(
        d["verdict"]
            .as_str()
            .unwrap_or("")
            .starts_with("compute-bound"),
        "{d}"
    );
    // The CLI prints the same document.
    let d = json(&[
        "bench",
        "e2e",
        "--data",
        &data,
        "--arch",
        "resnet18",
        "--batch-size",
        "4",
        "--image-size",
        "16",
        "--threads",
        "1",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--device",
        "cpu",
    ])?;
    assert!(
        d["verdict"].is_string() && d["images_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{d}"
    );
    Ok(())
}

#[derive(clap::Parser)]
struct Probe {
    #[command(flatten)]
    args: E2eBenchArgs,
}

#[test]
fn train_and_infer_report_their_figures() -> Result<()> {
    let d = json(&[
        "bench",
        "train",
        "--arch",
        "resnet18",
        "--batch-size",
        "2",
        "--image-size",
        "32",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--device",
        "cpu",
    ])?;
    assert!(d["images_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{d}");
    let d = json(&[
        "bench",
        "infer",
        "--arch",
        "resnet18",
        "--batch-sizes",
        "1,2",
        "--image-size",
        "32",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ])?;
    let rows = d["results"].as_array().context("results")?;
    assert_eq!(rows.len(), 2);
    for r in rows {
        let l = &r["latency_ms"];
        assert!(
            l["p50"].as_f64() <= l["p90"].as_f64() && l["p90"].as_f64() <= l["p99"].as_f64(),
            "{r}"
        );
    }
    Ok(())
}

#[test]
fn e2e_over_whole_epochs_reports_each_epoch_and_their_mean() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = dataset(tmp.path(), 32, 8)?;
    let d = json(&[
        "bench",
        "e2e",
        "--data",
        &data,
        "--arch",
        "resnet18",
        "--batch-size",
        "4",
        "--image-size",
        "16",
        "--threads",
        "1",
        "--steps",
        "2",
        "--warmup-steps",
        "1",
        "--epochs",
        "3",
        "--device",
        "cpu",
    ])?;
    let epochs: Vec<f64> = d["epoch_images_per_s"]
        .as_array()
        .context("epoch_images_per_s")?
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    assert_eq!(epochs.len(), 3, "{d}");
    assert!(epochs.iter().all(|&r| r > 0.0), "{d}");
    // The figure is the mean of the epochs after the first (warm-up).
    let mean = (epochs[1] + epochs[2]) / 2.0;
    let got = d["images_per_s"].as_f64().context("images_per_s")?;
    assert!((got - mean).abs() <= 1e-9 * mean, "{got} vs {mean}: {d}");
    // One epoch alone has no epoch left to measure.
    let out = Command::new(env!("CARGO_BIN_EXE_convnets"))
        .args([
            "bench",
            "e2e",
            "--data",
            &data,
            "--arch",
            "resnet18",
            "--batch-size",
            "4",
        ])
        .args([
            "--image-size",
            "16",
            "--threads",
            "1",
            "--epochs",
            "1",
            "--device",
            "cpu",
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--epochs 1: needs 2 or more"));
    Ok(())
}
