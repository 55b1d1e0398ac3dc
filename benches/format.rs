//! Throughput of the packed format (`convnets-formats`): how fast `pack()` turns an
//! ImageNet folder into shards, how fast `ShardWriter` appends, and how fast records come
//! back out of the page cache, in random and in sequential order.
//!
//! ```text
//! cargo bench --bench format                          # generated input, ~15 s on 2 cores
//! cargo bench --bench format -- --data DIR            # DIR/train/<wnid>/*.JPEG
//! CONVNETS_BENCH_DATA=DIR cargo bench --bench format
//! ```
//!
//! Prints one JSON document on stdout and a short table on stderr. Options (each also an
//! environment variable): `--data DIR` (`CONVNETS_BENCH_DATA`), `--images N`
//! (`CONVNETS_BENCH_IMAGES`, generated input only, default 1000), `--pack-threads 1,16`
//! (`CONVNETS_BENCH_PACK_THREADS`, default `1,<cores>`), `--read-threads 1,16`
//! (`CONVNETS_BENCH_READ_THREADS`, default `1,<cores>`), `--min-time SECS`
//! (`CONVNETS_BENCH_MIN_TIME`, per figure, default 0.5), `--writer-mib MIB`
//! (`CONVNETS_BENCH_WRITER_MIB`, default 128: one shard of the packer's default size).
//!
//! `--generate-only DIR` writes the generated input to `DIR/train/<wnid>/` and exits (to
//! bench the same input elsewhere, or a bigger set with `--images`).
//!
//! `--data DIR` takes the ImageNet layout `DIR/train/<wnid>/*`; a folder of class folders
//! with no `train/` (what `gen_imagenet_like.py DIR ...` writes) is linked in as `train/`.
//!
//! What each figure covers:
//! - pack: `pack()` end to end, repeated into fresh folders for at least `--min-time`,
//!   with every input file already in the page cache and output to a temporary folder on
//!   the same disk (shards are fsynced, as in real use). Input MB/s counts the input
//!   files' bytes. `verify_decode` on = the packer's default (full decode of every kept
//!   JPEG); off = header checks only.
//! - shard_writer: `ShardWriter::append` of records already in memory (the benchmark's
//!   JPEGs, cycled) up to `--writer-mib`, then `finish` (index, fsync, rename), timed
//!   apart; repeated for at least `--min-time`.
//! - read: `SplitReader::record` (CRC32C over every byte) and `record_unchecked` (no CRC;
//!   one byte per 4 KiB page is read so the mapping is really touched: its GB/s counts
//!   bytes handed out, not bytes read, and records/s is the figure), over a random
//!   permutation or in file order, on 1 thread and on all threads (each thread reads its
//!   own contiguous slice of the order). The page cache and the mapping are warmed by one
//!   full read first, so these are memory-speed figures.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use convnets_formats::{Dataset, RecordSource, ShardWriter, SplitReader};
use convnets_pack::pack::{pack, PackOptions, PackSource, Quiet};
use convnets_pack::sanitize::SanitizeOptions;
use serde_json::{json, Value};

mod common;
use common::{generate_imagenet_like, shuffle, GENERATED_CLASSES, JPEG_QUALITY, SHAPES};

const PAGE: usize = 4096;

struct Settings {
    data: Option<PathBuf>,
    generate_only: Option<PathBuf>,
    images: usize,
    pack_threads: Vec<usize>,
    read_threads: Vec<usize>,
    min_time: Duration,
    writer_bytes: u64,
}

fn main() -> Result<()> {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let settings = parse_args(cores)?;
    if let Some(dir) = &settings.generate_only {
        generate_imagenet_like(dir, settings.images, cores)?;
        eprintln!(
            "wrote {} JPEGs under {}",
            settings.images,
            dir.join("train").display()
        );
        return Ok(());
    }
    let tmp = tempfile::Builder::new()
        .prefix("convnets-bench-format")
        .tempdir()?;

    // Input: an ImageNet-like root (root/train/<wnid>/*).
    let (root, input_kind) = match &settings.data {
        Some(dir) => (imagenet_root(dir, tmp.path())?, "folder"),
        None => {
            let root = tmp.path().join("input");
            eprintln!(
                "generating {} JPEGs ({} classes, quality {JPEG_QUALITY}, 4:2:0)...",
                settings.images, GENERATED_CLASSES
            );
            generate_imagenet_like(&root, settings.images, cores)?;
            (root, "generated")
        }
    };
    let inputs = list_inputs(&root)?;
    if inputs.is_empty() {
        bail!("{}: no input images found", root.display());
    }
    // Read every input once so pack() measures CPU work, not the disk.
    let sizes: Vec<u64> = inputs
        .iter()
        .map(|p| std::fs::read(p).map(|b| b.len() as u64))
        .collect::<std::io::Result<_>>()?;
    let input_bytes: u64 = sizes.iter().sum();
    let n_inputs = inputs.len() as u64;
    eprintln!(
        "input: {n_inputs} files, {:.1} MB, {} threads available",
        input_bytes as f64 / 1e6,
        cores
    );

    // pack(): each (threads, verify_decode) into a fresh folder; the last one is kept for reads.
    let mut pack_rows = Vec::new();
    let mut packed = None;
    for &verify in &[false, true] {
        for &threads in &settings.pack_threads {
            let source = PackSource::ImageFolder {
                root: root.clone(),
                val_labels: None,
            };
            let opts = PackOptions {
                threads,
                sanitize: SanitizeOptions {
                    verify_decode: verify,
                    ..SanitizeOptions::default()
                },
                ..PackOptions::default()
            };
            // Repeated into fresh folders until min_time has been spent packing.
            let (mut runs, mut secs) = (0u32, 0.0);
            let (out, report) = loop {
                let out = tmp
                    .path()
                    .join(format!("packed-t{threads}-v{}-r{runs}", verify as u8));
                let t = Instant::now();
                let report = pack(&source, &out, &opts, &Quiet)
                    .with_context(|| format!("packing {}", root.display()))?;
                secs += t.elapsed().as_secs_f64();
                runs += 1;
                if secs >= settings.min_time.as_secs_f64() {
                    break (out, report);
                }
                std::fs::remove_dir_all(&out)?;
            };
            let sum = |f: fn(&convnets_pack::pack::SplitReport) -> u64| {
                report.splits.values().map(f).sum::<u64>()
            };
            let output_bytes: u64 = std::fs::read_dir(&out)?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "cnr"))
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum();
            let per_run = secs / f64::from(runs);
            pack_rows.push(json!({
                "threads": threads,
                "verify_decode": verify,
                "images": sum(|s| s.inputs),
                "records": sum(|s| s.records),
                "kept": sum(|s| s.kept),
                "reencoded": sum(|s| s.reencoded),
                "rejected": sum(|s| s.rejected) + sum(|s| s.skipped),
                "shards": sum(|s| s.shards),
                "runs": runs,
                "seconds_per_run": round(per_run, 4),
                "images_per_s": round(n_inputs as f64 / per_run, 1),
                "input_mb_per_s": round(input_bytes as f64 / 1e6 / per_run, 1),
                "output_bytes": output_bytes,
            }));
            eprintln!("  pack threads={threads} verify_decode={verify}: {per_run:.3} s per run, {runs} runs");
            if let Some(old) = packed.replace(out) {
                std::fs::remove_dir_all(old)?;
            }
        }
    }
    let packed = packed.context("no pack run")?;

    // ShardWriter alone, on records already in memory.
    let writer = bench_shard_writer(
        &inputs,
        tmp.path(),
        settings.writer_bytes,
        settings.min_time,
    )?;

    // Reads from the page cache.
    let t = Instant::now();
    let dataset = Dataset::open(&packed)?;
    let split = dataset.split("train")?;
    let open_s = t.elapsed().as_secs_f64();
    let n = split.len();
    let seq_order: Vec<usize> = (0..n).collect();
    read_pass(&split, &seq_order, true)?; // warm page cache and mapping
    let random_order = {
        let mut order = seq_order.clone();
        shuffle(&mut order, 0x5eed);
        order
    };
    let mut read_rows = Vec::new();
    for (order_name, order) in [("random", &random_order), ("sequential", &seq_order)] {
        for checked in [true, false] {
            for &threads in &settings.read_threads {
                let (records, bytes, secs) =
                    timed_reads(&split, order, checked, threads, settings.min_time)?;
                read_rows.push(json!({
                    "order": order_name,
                    "method": if checked { "record" } else { "record_unchecked" },
                    "crc32c": checked,
                    "threads": threads,
                    "records": records,
                    "bytes": bytes,
                    "seconds": round(secs, 4),
                    "records_per_s": round(records as f64 / secs, 0),
                    "gb_per_s": round(bytes as f64 / 1e9 / secs, 3),
                }));
            }
        }
    }
    let dataset_bytes: u64 = split.shards().iter().map(|s| s.file_len()).sum();

    let doc = json!({
        "bench": "format",
        "machine": machine_info(cores),
        "settings": {
            "input": input_kind,
            "input_dir": settings.data.as_ref().map(|p| p.display().to_string()),
            "images": n_inputs,
            "input_bytes": input_bytes,
            "mean_image_bytes": input_bytes / n_inputs,
            "min_image_bytes": sizes.iter().min(),
            "max_image_bytes": sizes.iter().max(),
            "generated": if settings.data.is_none() {
                json!({"shapes": SHAPES.iter().map(|(w, h)| format!("{w}x{h}")).collect::<Vec<_>>(),
                       "quality": JPEG_QUALITY, "subsampling": "4:2:0", "classes": GENERATED_CLASSES})
            } else { Value::Null },
            "pack_threads": settings.pack_threads,
            "read_threads": settings.read_threads,
            "read_min_time_s": settings.min_time.as_secs_f64(),
            "read_touch_unchecked": "one byte per 4 KiB page; its gb_per_s counts the bytes handed out, not bytes read",
            "temp_dir": tmp.path().display().to_string(),
            "units": "MB = 1e6 bytes, GB = 1e9 bytes",
        },
        "pack": pack_rows,
        "shard_writer": writer,
        "read": {
            "dataset_records": n,
            "dataset_bytes": dataset_bytes,
            "shards": split.shards().len(),
            "open_split_s": round(open_s, 5),
            "runs": read_rows,
        },
        "total_seconds": round(started.elapsed().as_secs_f64(), 2),
    });
    print_table(&doc);
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

fn parse_args(cores: usize) -> Result<Settings> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut data = env("CONVNETS_BENCH_DATA");
    let mut images = env("CONVNETS_BENCH_IMAGES");
    let mut pack_threads = env("CONVNETS_BENCH_PACK_THREADS");
    let mut read_threads = env("CONVNETS_BENCH_READ_THREADS");
    let mut min_time = env("CONVNETS_BENCH_MIN_TIME");
    let mut writer_mib = env("CONVNETS_BENCH_WRITER_MIB");
    let mut generate_only = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let slot = match key.as_str() {
            "--data" => &mut data,
            "--images" => &mut images,
            "--pack-threads" => &mut pack_threads,
            "--read-threads" => &mut read_threads,
            "--min-time" => &mut min_time,
            "--writer-mib" => &mut writer_mib,
            "--generate-only" => &mut generate_only,
            // `cargo bench` passes --bench; libtest filters are not ours to handle.
            "--bench" => continue,
            "-h" | "--help" => {
                eprintln!("usage: cargo bench --bench format -- [--data DIR] [--images N] [--pack-threads 1,N] [--read-threads 1,N] [--min-time SECS] [--writer-mib MIB] | [--images N] --generate-only DIR");
                std::process::exit(0);
            }
            other if other.starts_with('-') => bail!("unknown option {other} (try --help)"),
            _ => continue,
        };
        *slot = Some(match inline {
            Some(v) => v,
            None => args
                .next()
                .with_context(|| format!("{key} needs a value"))?,
        });
    }
    let default_threads = if cores > 1 { vec![1, cores] } else { vec![1] };
    let list = |v: Option<String>, what: &str| -> Result<Vec<usize>> {
        match v {
            None => Ok(default_threads.clone()),
            Some(s) => s
                .split(',')
                .map(|t| {
                    t.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n > 0)
                        .with_context(|| format!("{what}: bad thread count '{t}'"))
                })
                .collect(),
        }
    };
    Ok(Settings {
        data: data.map(PathBuf::from),
        generate_only: generate_only.map(PathBuf::from),
        images: images
            .map(|s| s.parse())
            .transpose()
            .context("--images")?
            .unwrap_or(1000),
        pack_threads: list(pack_threads, "--pack-threads")?,
        read_threads: list(read_threads, "--read-threads")?,
        min_time: Duration::from_secs_f64(
            min_time
                .map(|s| s.parse())
                .transpose()
                .context("--min-time")?
                .unwrap_or(0.5),
        ),
        writer_bytes: writer_mib
            .map(|s| s.parse::<u64>())
            .transpose()
            .context("--writer-mib")?
            .unwrap_or(128)
            << 20,
    })
}

/// `dir` itself when it has the ImageNet layout; otherwise (class folders directly under
/// `dir`) a folder in `tmp` whose `train` links to `dir`.
fn imagenet_root(dir: &Path, tmp: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail!("--data {}: no such folder", dir.display());
    }
    if ["train", "val", "validation"]
        .iter()
        .any(|s| dir.join(s).is_dir())
    {
        return Ok(dir.to_path_buf());
    }
    let root = tmp.join("input-root");
    std::fs::create_dir_all(&root)?;
    let target = std::fs::canonicalize(dir)?;
    std::os::unix::fs::symlink(&target, root.join("train"))?;
    eprintln!(
        "{}: no train/ inside, using it as the train/ class-folder root",
        dir.display()
    );
    Ok(root)
}

/// Every file that `pack` reads: root/{train,val,validation}/**, hidden names skipped.
fn list_inputs(root: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = e.path();
            let meta = std::fs::metadata(&path)?;
            if meta.is_dir() {
                walk(&path, out)?;
            } else if meta.is_file() {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for split in ["train", "val", "validation"] {
        let dir = root.join(split);
        if dir.is_dir() {
            walk(&dir, &mut out)?;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Shard writer

fn bench_shard_writer(
    inputs: &[PathBuf],
    tmp: &Path,
    target_bytes: u64,
    min_time: Duration,
) -> Result<Value> {
    let mut records = Vec::new();
    let mut loaded = 0u64;
    for p in inputs.iter().take(2000) {
        let b = std::fs::read(p)?;
        if b.is_empty() {
            continue;
        }
        loaded += b.len() as u64;
        records.push(b);
        if loaded >= target_bytes {
            break;
        }
    }
    let path = tmp.join("writer-bench.cnr");
    let (mut runs, mut append_s, mut finish_s) = (0u32, 0.0, 0.0);
    let (mut count, mut bytes, mut file_bytes) = (0u64, 0u64, 0u64);
    // One shard of target_bytes per run, repeated until min_time has been spent.
    while runs == 0 || append_s + finish_s < min_time.as_secs_f64() {
        let mut writer = ShardWriter::create(&path)?;
        let (mut n, mut b) = (0u64, 0u64);
        let t = Instant::now();
        for rec in records.iter().cycle() {
            if b >= target_bytes {
                break;
            }
            writer.append(rec, (n % 1000) as u32, 500, 375)?;
            n += 1;
            b += rec.len() as u64;
        }
        append_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let summary = writer.finish()?;
        finish_s += t.elapsed().as_secs_f64();
        std::fs::remove_file(&path)?;
        runs += 1;
        count += n;
        bytes += b;
        file_bytes = summary.bytes;
    }
    let total = append_s + finish_s;
    eprintln!(
        "  shard writer: {runs} shards of {} records, {:.0} MB each, {:.3} s each",
        count / u64::from(runs),
        bytes as f64 / 1e6 / f64::from(runs),
        total / f64::from(runs)
    );
    Ok(json!({
        "runs": runs,
        "records_per_run": count / u64::from(runs),
        "record_bytes_per_run": bytes / u64::from(runs),
        "file_bytes": file_bytes,
        "distinct_records": records.len(),
        "append_s_per_run": round(append_s / f64::from(runs), 4),
        "finish_s_per_run": round(finish_s / f64::from(runs), 4),
        "records_per_s": round(count as f64 / total, 0),
        "gb_per_s": round(bytes as f64 / 1e9 / total, 3),
        "append_only_records_per_s": round(count as f64 / append_s, 0),
        "append_only_gb_per_s": round(bytes as f64 / 1e9 / append_s, 3),
    }))
}

// ---------------------------------------------------------------------------------------
// Reads

/// Reads `order` once; returns (records, bytes, checksum of touched bytes).
fn read_pass(split: &SplitReader, order: &[usize], checked: bool) -> Result<(u64, u64, u64)> {
    let (mut bytes, mut sink) = (0u64, 0u64);
    for &i in order {
        let rec = if checked {
            split.record(i)?
        } else {
            split.record_unchecked(i)?
        };
        let data = &rec.data;
        bytes += data.len() as u64;
        if !checked {
            // Touch every page of the record, as a decoder would.
            for off in (0..data.len()).step_by(PAGE) {
                sink = sink.wrapping_add(u64::from(data[off]));
            }
            sink = sink.wrapping_add(u64::from(data[data.len() - 1]));
        }
        sink = sink.wrapping_add(u64::from(rec.label));
    }
    Ok((order.len() as u64, bytes, std::hint::black_box(sink)))
}

/// Reads `order` over and over on `threads` threads (each its own contiguous slice)
/// until `min_time` has passed; returns (records, bytes, seconds).
fn timed_reads(
    split: &SplitReader,
    order: &[usize],
    checked: bool,
    threads: usize,
    min_time: Duration,
) -> Result<(u64, u64, f64)> {
    let chunk = order.len().div_ceil(threads).max(1);
    let t = Instant::now();
    let totals = std::thread::scope(|s| {
        let handles: Vec<_> = order
            .chunks(chunk)
            .map(|slice| {
                s.spawn(move || -> Result<(u64, u64)> {
                    let (mut records, mut bytes) = (0, 0);
                    loop {
                        let (r, b, _) = read_pass(split, slice, checked)?;
                        records += r;
                        bytes += b;
                        if t.elapsed() >= min_time {
                            return Ok((records, bytes));
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("reader thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let secs = t.elapsed().as_secs_f64();
    let (records, bytes) = totals
        .iter()
        .fold((0, 0), |(r, b), (r2, b2)| (r + r2, b + b2));
    Ok((records, bytes, secs))
}

// ---------------------------------------------------------------------------------------
// Reporting

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn machine_info(cores: usize) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
    let mem_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let kb: f64 = s
            .lines()
            .find(|l| l.starts_with("MemTotal"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(round(kb / (1 << 20) as f64, 1))
    });
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "cores": cores,
        "arch": command_line("uname", &["-m"]).unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        "kernel": command_line("uname", &["-r"]),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "unix_time": unix_time,
    })
}

fn print_table(doc: &Value) {
    let s = &doc["settings"];
    eprintln!();
    eprintln!(
        "packed format: {} images, {:.1} MB input ({} KiB mean), {} cores",
        s["images"],
        s["input_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        s["mean_image_bytes"].as_u64().unwrap_or(0) / 1024,
        doc["machine"]["cores"]
    );
    eprintln!("{:<44} {:>14} {:>10}", "", "items/s", "MB/s");
    for r in doc["pack"].as_array().into_iter().flatten() {
        let name = format!(
            "pack threads={} verify_decode={}",
            r["threads"], r["verify_decode"]
        );
        eprintln!(
            "{:<44} {:>14.0} {:>10.1}",
            name,
            r["images_per_s"].as_f64().unwrap_or(0.0),
            r["input_mb_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    let w = &doc["shard_writer"];
    eprintln!(
        "{:<44} {:>14.0} {:>10.0}",
        "ShardWriter append+finish",
        w["records_per_s"].as_f64().unwrap_or(0.0),
        w["gb_per_s"].as_f64().unwrap_or(0.0) * 1e3
    );
    eprintln!(
        "{:<44} {:>14.0} {:>10.0}",
        "ShardWriter append only",
        w["append_only_records_per_s"].as_f64().unwrap_or(0.0),
        w["append_only_gb_per_s"].as_f64().unwrap_or(0.0) * 1e3
    );
    for r in doc["read"]["runs"].as_array().into_iter().flatten() {
        let name = format!(
            "read {} {} threads={}",
            r["order"].as_str().unwrap_or(""),
            r["method"].as_str().unwrap_or(""),
            r["threads"]
        );
        let mb_per_s = match r["crc32c"].as_bool() {
            // Unchecked reads touch one byte per page: their byte rate means nothing.
            Some(true) => format!("{:.0}", r["gb_per_s"].as_f64().unwrap_or(0.0) * 1e3),
            _ => "-".into(),
        };
        eprintln!(
            "{:<44} {:>14.0} {:>10}",
            name,
            r["records_per_s"].as_f64().unwrap_or(0.0),
            mb_per_s
        );
    }
    eprintln!(
        "total {:.1} s",
        doc["total_seconds"].as_f64().unwrap_or(0.0)
    );
}
