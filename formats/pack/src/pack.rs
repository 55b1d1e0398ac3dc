//! The ImageNet packer: an ImageNet folder or a TFRecord folder in, a dataset folder
//! (manifest + shards) out.
//!
//! Every input file goes through [`crate::sanitize`]: clean baseline JPEGs are stored
//! byte-identical, awkward ones are re-encoded (or skipped, by policy) and broken ones
//! are refused; every file that is not stored as-is is named in `pack-report.json`.
//!
//! Output is deterministic for the same input, options and seed. Records are shuffled
//! across shards. Each finished shard is kept with a small sidecar in `.pack/`, so an
//! interrupted run picks up where it stopped.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use convnets_formats::atomic::write_atomic;
use convnets_formats::error::{Error, IoContext, Result};
use convnets_formats::lock::FileLock;
use convnets_formats::manifest::{ClassInfo, Manifest, ShardInfo, SplitInfo};
use convnets_formats::names::{escaped, escaped_path};
use convnets_formats::shard::{ShardReader, ShardWriter};
use convnets_formats::tfrecord::{list_tfrecord_files, TfRecordSource};
use convnets_formats::RecordSource;

use crate::sanitize::{sanitize, Outcome, SanitizeOptions};

pub const REPORT_NAME: &str = "pack-report.json";
const STATE_DIR: &str = ".pack";
const PLAN_NAME: &str = "plan.json";
const LOCK_NAME: &str = "lock";
pub const SHARD_EXT: &str = "cnr";

/// Where the images come from.
#[derive(Debug, Clone)]
pub enum PackSource {
    /// `root/train/<wnid>/*` and `root/val/` (class folders, or flat files with a labels
    /// file such as `LOC_val_solution.csv`).
    ImageFolder {
        root: PathBuf,
        /// Labels for a flat `val/`; found next to `root` when not given.
        val_labels: Option<PathBuf>,
    },
    /// `train-*` and `validation-*` TFRecord files as written by TensorFlow's
    /// `build_imagenet_data.py`.
    TfRecords {
        dir: PathBuf,
        /// Subtracted from `image/class/label` (1 for `build_imagenet_data.py`, whose
        /// label 0 is the unused background class).
        label_offset: i64,
    },
}

/// How many shards each split gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSizing {
    /// A fixed number of shards per split (train, val).
    Count { train: usize, val: usize },
    /// Shards of about this many bytes of input.
    TargetBytes(u64),
}

#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Seed of the shuffle across shards.
    pub seed: u64,
    pub sizing: ShardSizing,
    /// What happens to each image.
    pub sanitize: SanitizeOptions,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Stop with an error at the first file that is not stored (instead of reporting it).
    pub strict: bool,
    /// Input files larger than this are refused without being read.
    pub max_file_bytes: u64,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            sizing: ShardSizing::TargetBytes(128 << 20),
            sanitize: SanitizeOptions::default(),
            threads: 0,
            strict: false,
            max_file_bytes: 256 << 20,
        }
    }
}

/// Progress callbacks, so the library stays free of terminal concerns.
pub trait PackProgress: Sync {
    fn split_started(&self, _split: &str, _records: u64, _already_done: u64) {}
    fn advanced(&self, _records: u64) {}
    fn split_finished(&self, _split: &str) {}
}

/// No progress output.
pub struct Quiet;
impl PackProgress for Quiet {}

/// One file that was not stored byte-identical, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReport {
    pub split: String,
    /// Input name: path relative to the input folder, or `file#record` for TFRecords.
    pub source: String,
    /// `reencoded`, `skipped` (awkward, skip policy) or `rejected` (cannot be stored).
    pub action: String,
    pub reason: String,
}

/// Counts for one split.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReport {
    pub inputs: u64,
    pub records: u64,
    pub shards: u64,
    pub kept: u64,
    pub reencoded: u64,
    pub skipped: u64,
    pub rejected: u64,
    /// Shards found finished from an earlier, interrupted run.
    pub resumed_shards: u64,
}

/// What `pack` did; also written to `pack-report.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackReport {
    pub splits: BTreeMap<String, SplitReport>,
    pub files: Vec<FileReport>,
}

/// One input image, before it is read.
#[derive(Debug, Clone, Serialize)]
struct Item {
    /// Name for reports and the plan fingerprint.
    name: String,
    label: u32,
    #[serde(skip)]
    origin: Origin,
    /// Input size in bytes (for shard sizing).
    size: u64,
}

#[derive(Debug, Clone)]
enum Origin {
    File(PathBuf),
    /// Record `index` of the split's TFRecord source.
    TfRecord(usize),
}

/// A split ready to pack: its items in their deterministic input order.
struct SplitInput {
    name: String,
    items: Vec<Item>,
    tfrecords: Option<TfRecordSource>,
    /// Input files refused while listing (e.g. a val image with no label).
    refused: Vec<FileReport>,
}

/// Packs `source` into the dataset folder `out`.
pub fn pack(
    source: &PackSource,
    out: &Path,
    opts: &PackOptions,
    progress: &dyn PackProgress,
) -> Result<PackReport> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start worker threads: {e}")))?;
    pool.install(|| pack_in_pool(source, out, opts, progress))
}

fn pack_in_pool(
    source: &PackSource,
    out: &Path,
    opts: &PackOptions,
    progress: &dyn PackProgress,
) -> Result<PackReport> {
    // The input is read and judged before anything is written.
    let (classes, mut splits) = match source {
        PackSource::ImageFolder { root, val_labels } => {
            scan_image_folder(root, val_labels.as_deref(), folder_id(out))?
        }
        PackSource::TfRecords { dir, label_offset } => scan_tfrecords(dir, *label_offset)?,
    };
    for split in &mut splits {
        refuse_oversized(split, opts.max_file_bytes);
    }
    if opts.strict {
        if let Some(r) = splits.iter().flat_map(|s| &s.refused).next() {
            return Err(Error::Input {
                path: r.source.clone().into(),
                reason: r.reason.clone(),
            });
        }
    }
    let created = prepare_output(out)?;
    let lock = FileLock::acquire(&out.join(STATE_DIR).join(LOCK_NAME)).map_err(|e| match e {
        Error::Locked { pid, .. } => Error::Input {
            path: out.to_path_buf(),
            reason: format!(
                "in use by PID {pid} (another pack-imagenet); wait for it to end or stop it first"
            ),
        },
        e => e,
    })?;
    let result = pack_locked(source, out, opts, progress, classes, splits);
    if result.is_err() {
        remove_unfinished(out, created);
    }
    drop(lock);
    result
}

/// What [`prepare_output`] made, so a failed pack can take it away again.
#[derive(Debug, Clone, Copy)]
struct Created {
    output: bool,
    state: bool,
}

/// Checks the output folder and creates it and its `.pack/`: a file, or a folder holding
/// something other than an earlier pack, is refused before anything is written.
fn prepare_output(out: &Path) -> Result<Created> {
    let output = match std::fs::metadata(out) {
        Ok(m) if m.is_dir() => false,
        Ok(_) => {
            return Err(Error::Input {
                path: out.to_path_buf(),
                reason: "output is a file, not a folder".into(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(e).at(out),
    };
    let state_dir = out.join(STATE_DIR);
    if !output && !state_dir.join(PLAN_NAME).is_file() {
        let foreign = std::fs::read_dir(out)
            .at(out)?
            .any(|e| e.map(|e| e.file_name() != STATE_DIR).unwrap_or(true));
        if foreign {
            return Err(Error::Input {
                path: out.to_path_buf(),
                reason: "output folder is not empty and was not made by pack-imagenet".into(),
            });
        }
    }
    let state = !state_dir.is_dir();
    std::fs::create_dir_all(&state_dir).at(&state_dir)?;
    Ok(Created { output, state })
}

/// After a failed pack that finished no shard: removes what this run created (the output
/// folder, else its `.pack/`), so an error leaves nothing behind. Finished shards stay, for
/// the next run to resume from.
fn remove_unfinished(out: &Path, created: Created) {
    let state_dir = out.join(STATE_DIR);
    let finished_any = std::fs::read_dir(&state_dir).is_ok_and(|mut entries| {
        entries.any(|e| {
            e.is_ok_and(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with(&format!(".{SHARD_EXT}.json"))
            })
        })
    });
    if finished_any {
        return;
    }
    if created.output {
        let _ = std::fs::remove_dir_all(out);
    } else if created.state {
        let _ = std::fs::remove_dir_all(&state_dir);
    }
}

/// (device, inode) of an existing folder, to recognise it however it is reached.
fn folder_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

fn pack_locked(
    source: &PackSource,
    out: &Path,
    opts: &PackOptions,
    progress: &dyn PackProgress,
    classes: Vec<ClassInfo>,
    mut splits: Vec<SplitInput>,
) -> Result<PackReport> {
    let plans: Vec<Vec<Vec<Item>>> = splits.iter().map(|s| plan_shards(s, opts)).collect();
    check_plan(out, source, opts, &classes, &splits, &plans)?;

    let mut manifest = Manifest::new(classes);
    manifest.created_by = serde_json::json!({
        "tool": concat!("convnets ", env!("CARGO_PKG_VERSION")),
        "source": source_description(source),
        "seed": opts.seed,
        "max_side": opts.sanitize.max_side,
        "quality": opts.sanitize.quality,
    });
    let mut report = PackReport::default();
    for (split, shards) in splits.iter_mut().zip(plans) {
        let (info, split_report, files) = pack_split(split, shards, out, opts, progress)?;
        manifest.splits.insert(split.name.clone(), info);
        report.splits.insert(split.name.clone(), split_report);
        report.files.extend(std::mem::take(&mut split.refused));
        report.files.extend(files);
    }
    let mut text = serde_json::to_vec_pretty(&report)
        .map_err(|e| Error::Invalid(format!("cannot serialise report: {e}")))?;
    text.push(b'\n');
    write_atomic(&out.join(REPORT_NAME), &text)?;
    // The manifest comes last: its presence means the dataset is complete.
    manifest.save(out)?;
    Ok(report)
}

/// Files over the size limit are refused without being read.
fn refuse_oversized(split: &mut SplitInput, max_bytes: u64) {
    let (ok, big): (Vec<Item>, Vec<Item>) = std::mem::take(&mut split.items)
        .into_iter()
        .partition(|i| i.size <= max_bytes);
    split.items = ok;
    split.refused.extend(big.into_iter().map(|i| FileReport {
        split: split.name.clone(),
        source: i.name,
        action: "rejected".into(),
        reason: format!("file is {} bytes, over the {max_bytes}-byte limit", i.size),
    }));
}

fn source_description(source: &PackSource) -> String {
    match source {
        PackSource::ImageFolder { root, .. } => format!("image folder {}", root.display()),
        PackSource::TfRecords { dir, .. } => format!("tfrecords {}", dir.display()),
    }
}

/// Shuffles a split's items across shards: shard `k` gets the `k`-th contiguous run of
/// the shuffled order, so shards differ in size by at most one record.
fn plan_shards(split: &SplitInput, opts: &PackOptions) -> Vec<Vec<Item>> {
    let mut items = split.items.clone();
    let split_seed = opts.seed ^ u64::from(crc32c::crc32c(split.name.as_bytes()));
    items.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(split_seed));
    let n = items.len();
    let count = match opts.sizing {
        ShardSizing::Count { train, val } => {
            if split.name == "train" {
                train
            } else {
                val
            }
        }
        ShardSizing::TargetBytes(target) => {
            let total: u64 = items.iter().map(|i| i.size).sum();
            total.div_ceil(target.max(1)) as usize
        }
    }
    .clamp(1, n.max(1));
    let mut shards = Vec::with_capacity(count);
    let mut rest = items.into_iter();
    for k in 0..count {
        let size = (k + 1) * n / count - k * n / count;
        shards.push(rest.by_ref().take(size).collect());
    }
    shards
}

/// Remembers what this output folder is being packed from, so a resumed run can only
/// continue the same job: resuming with other input or options would mix two datasets.
fn check_plan(
    out: &Path,
    source: &PackSource,
    opts: &PackOptions,
    classes: &[ClassInfo],
    splits: &[SplitInput],
    plans: &[Vec<Vec<Item>>],
) -> Result<()> {
    #[derive(Serialize)]
    struct Fingerprint<'a> {
        source: String,
        seed: u64,
        sanitize: String,
        classes: &'a [ClassInfo],
        shards: Vec<(&'a str, &'a [Vec<Item>])>,
    }
    let fp = Fingerprint {
        source: source_description(source),
        seed: opts.seed,
        sanitize: format!("{:?}", opts.sanitize),
        classes,
        shards: splits
            .iter()
            .zip(plans)
            .map(|(s, p)| (s.name.as_str(), p.as_slice()))
            .collect(),
    };
    let bytes = serde_json::to_vec(&fp).map_err(|e| Error::Invalid(e.to_string()))?;
    let digest = format!("{:08x}-{}", crc32c::crc32c(&bytes), bytes.len());
    let path = out.join(STATE_DIR).join(PLAN_NAME);
    match std::fs::read_to_string(&path) {
        Ok(existing) if existing.trim() == digest => Ok(()),
        Ok(_) => Err(Error::Input {
            path: out.to_path_buf(),
            reason: "this folder holds a pack made from other input or options; \
                     remove it or choose another output folder"
                .into(),
        }),
        // prepare_output() has refused a folder holding anything else.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic(&path, digest.as_bytes())
        }
        Err(e) => Err(e).at(&path),
    }
}

/// What the sidecar of a finished shard remembers.
#[derive(Debug, Serialize, Deserialize)]
struct ShardDone {
    info: ShardInfo,
    kept: u64,
    reencoded: u64,
    skipped: u64,
    rejected: u64,
    files: Vec<FileReport>,
}

fn pack_split(
    split: &SplitInput,
    shards: Vec<Vec<Item>>,
    out: &Path,
    opts: &PackOptions,
    progress: &dyn PackProgress,
) -> Result<(SplitInfo, SplitReport, Vec<FileReport>)> {
    let count = shards.len();
    let names: Vec<String> = (0..count)
        .map(|k| format!("{}-{k:05}-of-{count:05}.{SHARD_EXT}", split.name))
        .collect();
    let mut done: Vec<Option<ShardDone>> = names.iter().map(|n| finished_shard(out, n)).collect();
    let already: u64 = shards
        .iter()
        .zip(&done)
        .filter(|(_, d)| d.is_some())
        .map(|(s, _)| s.len() as u64)
        .sum();
    progress.split_started(&split.name, split.items.len() as u64, already);

    let resumed = done.iter().filter(|d| d.is_some()).count() as u64;

    // Shards are processed one after another, each by all threads; a writer thread
    // writes shard k while shard k+1 is being decoded, so memory stays bounded.
    let stop = AtomicBool::new(false);
    let written = std::thread::scope(|scope| -> Result<Vec<(usize, ShardDone)>> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<Processed>)>(1);
        let names = &names;
        let stop = &stop;
        let writer = scope.spawn(move || -> Result<Vec<(usize, ShardDone)>> {
            let mut written = Vec::new();
            for (k, results) in rx {
                match write_shard(out, &split.name, names[k].as_str(), results) {
                    Ok(d) => written.push((k, d)),
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
            Ok(written)
        });
        let mut first_error = None;
        for (k, items) in shards.iter().enumerate() {
            if done[k].is_some() {
                continue;
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let results: Vec<Processed> = items
                .par_iter()
                .map(|item| {
                    let outcome = read_item(split, item).map(|bytes| {
                        let outcome = sanitize(&bytes, &opts.sanitize);
                        (bytes, outcome)
                    });
                    progress.advanced(1);
                    (item.clone(), outcome)
                })
                .collect();
            if let Some(e) = results.iter().find_map(|r| hard_error(r, opts.strict)) {
                first_error = Some(e);
                break;
            }
            if tx.send((k, results)).is_err() {
                break;
            }
        }
        drop(tx);
        let written = writer
            .join()
            .map_err(|_| Error::Invalid("shard writer thread panicked".into()))??;
        match first_error {
            Some(e) => Err(e),
            None => Ok(written),
        }
    })?;
    for (k, d) in written {
        done[k] = Some(d);
    }
    progress.split_finished(&split.name);

    let mut info = SplitInfo {
        records: 0,
        shards: Vec::with_capacity(count),
    };
    let mut report = SplitReport {
        inputs: (split.items.len() + split.refused.len()) as u64,
        shards: count as u64,
        rejected: split.refused.len() as u64,
        resumed_shards: resumed,
        ..Default::default()
    };
    let mut files = Vec::new();
    for d in done.into_iter() {
        let d = d.ok_or_else(|| Error::Invalid("a shard was not written".into()))?;
        info.records += d.info.records;
        report.kept += d.kept;
        report.reencoded += d.reencoded;
        report.skipped += d.skipped;
        report.rejected += d.rejected;
        files.extend(d.files);
        info.shards.push(d.info);
    }
    report.records = info.records;
    Ok((info, report, files))
}

/// An item, its input bytes and what became of it.
type Processed = (Item, Result<(Bytes, Outcome)>);

/// Errors that stop the pack: I/O failures reading the input always do (they say
/// nothing about the image), and with `strict` so does any file that is not stored.
fn hard_error((item, outcome): &Processed, strict: bool) -> Option<Error> {
    match outcome {
        Err(e) => Some(Error::Input {
            path: item.name.clone().into(),
            reason: e.to_string(),
        }),
        Ok((_, o)) if strict => match describe(o) {
            Some((action, reason)) if action != "reencoded" => Some(Error::Input {
                path: item.name.clone().into(),
                reason: format!("{action}: {reason} (--strict)"),
            }),
            _ => None,
        },
        Ok(_) => None,
    }
}

/// (action, reason) for a file that is not stored byte-identical; None when it is.
fn describe(outcome: &Outcome) -> Option<(&'static str, String)> {
    match outcome {
        Outcome::Kept { .. } => None,
        Outcome::Reencoded { reason, .. } => Some(("reencoded", reason.to_string())),
        Outcome::SkippedAwkward { reason } => Some(("skipped", reason.to_string())),
        Outcome::Rejected(problem) => Some(("rejected", problem.to_string())),
    }
}

/// A shard counts as finished when both it and its sidecar exist and agree.
fn finished_shard(out: &Path, name: &str) -> Option<ShardDone> {
    let sidecar = out.join(STATE_DIR).join(format!("{name}.json"));
    let done: ShardDone = serde_json::from_slice(&std::fs::read(sidecar).ok()?).ok()?;
    let reader = ShardReader::open(&out.join(name)).ok()?;
    // The full CRC costs one read of the shard, far less than packing it again, and
    // keeps a shard damaged since it was written from being taken as finished.
    let same = reader.len() as u64 == done.info.records
        && reader.file_len() == done.info.bytes
        && reader.file_crc32c() == done.info.crc32c;
    same.then_some(done)
}

fn write_shard(out: &Path, split: &str, name: &str, results: Vec<Processed>) -> Result<ShardDone> {
    let path = out.join(name);
    let mut writer = ShardWriter::create(&path)?;
    let mut done = ShardDone {
        info: ShardInfo {
            file: name.to_string(),
            records: 0,
            bytes: 0,
            crc32c: 0,
        },
        kept: 0,
        reencoded: 0,
        skipped: 0,
        rejected: 0,
        files: Vec::new(),
    };
    for (item, outcome) in results {
        // hard_error() has already stopped the pack on Err.
        let Ok((input, outcome)) = outcome else {
            continue;
        };
        if let Some((action, reason)) = describe(&outcome) {
            done.files.push(FileReport {
                split: split.to_string(),
                source: item.name.clone(),
                action: action.to_string(),
                reason,
            });
        }
        match outcome {
            Outcome::Kept { width, height } => {
                writer.append(&input, item.label, width, height)?;
                done.kept += 1;
            }
            Outcome::Reencoded {
                data,
                width,
                height,
                ..
            } => {
                writer.append(&data, item.label, width, height)?;
                done.reencoded += 1;
            }
            Outcome::SkippedAwkward { .. } => done.skipped += 1,
            Outcome::Rejected(_) => done.rejected += 1,
        }
    }
    let summary = writer.finish()?;
    done.info.records = summary.records;
    done.info.bytes = summary.bytes;
    done.info.crc32c = summary.crc32c;
    let sidecar = out.join(STATE_DIR).join(format!("{name}.json"));
    let text = serde_json::to_vec(&done).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&sidecar, &text)?;
    Ok(done)
}

fn read_item(split: &SplitInput, item: &Item) -> Result<Bytes> {
    match &item.origin {
        Origin::File(path) => Ok(Bytes::from(std::fs::read(path).at(path)?)),
        Origin::TfRecord(i) => {
            let source = split
                .tfrecords
                .as_ref()
                .ok_or_else(|| Error::Invalid("TFRecord item without a source".into()))?;
            Ok(source.record(*i)?.data)
        }
    }
}

// ---------------------------------------------------------------------------------------
// ImageNet folders

/// Lists `root/train` and `root/val` (or `root/validation`). `out` is the output folder
/// (if it exists already), which is never taken for input.
fn scan_image_folder(
    root: &Path,
    val_labels: Option<&Path>,
    out: Option<(u64, u64)>,
) -> Result<(Vec<ClassInfo>, Vec<SplitInput>)> {
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Input {
                path: root.to_path_buf(),
                reason: "input is a file, not a folder (expected the ImageNet layout \
                         train/<wnid>/*.JPEG, or a folder of TFRecords)"
                    .into(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Input {
                path: root.to_path_buf(),
                reason: "input folder does not exist".into(),
            })
        }
        Err(e) => return Err(e).at(root),
    }
    let train_dir = root.join("train");
    let val_dir = ["val", "validation"]
        .iter()
        .map(|n| root.join(n))
        .find(|p| p.is_dir());
    if !train_dir.is_dir() && val_dir.is_none() {
        return Err(Error::Input {
            path: root.to_path_buf(),
            reason:
                "neither train/ nor val/ found (expected the ImageNet layout train/<wnid>/*.JPEG)"
                    .into(),
        });
    }
    let val_labels = match (&val_dir, val_labels) {
        (_, Some(p)) => Some(read_val_labels(p)?),
        (Some(v), None) if subdirs(v, out)?.is_empty() => {
            let found = ["LOC_val_solution.csv", "val_labels.txt", "val.txt"]
                .iter()
                .flat_map(|n| [root.join(n), root.join("..").join(n)])
                .find(|p| p.is_file());
            match found {
                Some(p) => Some(read_val_labels(&p)?),
                None => {
                    return Err(Error::Input {
                        path: v.clone(),
                        reason: "val/ holds images without class folders and no labels file \
                                 (LOC_val_solution.csv) was found; pass --val-labels FILE"
                            .into(),
                    })
                }
            }
        }
        _ => None,
    };

    // The split whose folders define the classes, if the classes come from folders.
    let class_dir = if train_dir.is_dir() {
        Some(train_dir.clone())
    } else if val_labels.is_some() {
        None
    } else {
        val_dir.clone()
    };
    let wnids: Vec<String> = match &class_dir {
        Some(dir) => {
            let folders = subdirs(dir, out)?;
            refuse_empty_classes(dir, &folders)?;
            folders.iter().map(|f| escaped(f)).collect()
        }
        None => {
            let mut w: Vec<String> = val_labels
                .iter()
                .flat_map(|labels| labels.values().cloned())
                .collect();
            w.sort();
            w.dedup();
            w
        }
    };
    if wnids.is_empty() {
        return Err(Error::Input {
            path: class_dir.unwrap_or(train_dir),
            reason: "no class folders found".into(),
        });
    }
    let names = read_class_names(root)?;
    let classes: Vec<ClassInfo> = wnids
        .iter()
        .map(|w| ClassInfo {
            wnid: w.clone(),
            name: names.get(w).cloned().unwrap_or_else(|| w.clone()),
        })
        .collect();
    let label_of: HashMap<&str, u32> = wnids
        .iter()
        .enumerate()
        .map(|(i, w)| (w.as_str(), i as u32))
        .collect();

    let mut splits = Vec::new();
    if train_dir.is_dir() {
        splits.push(scan_class_folders(
            root, "train", &train_dir, &label_of, out,
        )?);
    }
    if let Some(val_dir) = val_dir {
        let split = match &val_labels {
            Some(labels) => scan_flat_val(root, &val_dir, labels, &label_of)?,
            None => scan_class_folders(root, "val", &val_dir, &label_of, out)?,
        };
        splits.push(split);
    }
    Ok((classes, splits))
}

/// A class folder without images would be a class no sample can teach (torchvision's
/// `ImageFolder` refuses one too), and leaving it out would renumber the classes after it:
/// the pack stops and names every such folder.
fn refuse_empty_classes(dir: &Path, folders: &[OsString]) -> Result<()> {
    let mut empty = Vec::new();
    for folder in folders {
        if files_in(&dir.join(folder))?.is_empty() {
            empty.push(escaped(folder));
        }
    }
    let Some(first) = empty.first() else {
        return Ok(());
    };
    let others = match empty.len() {
        1 => String::new(),
        n => format!(" ({n} such folders: {})", empty.join(", ")),
    };
    Err(Error::Input {
        path: dir.join(first),
        reason: format!(
            "class folder holds no image files{others}; add images or remove it \
             (sub-folders of a class folder are not read)"
        ),
    })
}

/// Sorted names of the sub-folders of `dir` (hidden ones ignored), as the file system has
/// them (not necessarily UTF-8). The output folder `out` is left out; a link back to `dir`
/// or a folder above it (a loop) is refused.
fn subdirs(dir: &Path, out: Option<(u64, u64)>) -> Result<Vec<OsString>> {
    let mut found = Vec::new();
    let mut canonical_dir = None;
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        let path = entry.path();
        if name.as_encoded_bytes().starts_with(b".") || !path.is_dir() {
            continue;
        }
        if out.is_some() && folder_id(&path) == out {
            continue;
        }
        if entry.file_type().at(&path)?.is_symlink() {
            let canonical_dir = match &canonical_dir {
                Some(c) => c,
                None => canonical_dir.insert(std::fs::canonicalize(dir).at(dir)?),
            };
            let target = std::fs::canonicalize(&path).at(&path)?;
            if canonical_dir.starts_with(&target) {
                return Err(Error::Input {
                    path,
                    reason: format!(
                        "link to {}, which holds it (a loop); remove the link",
                        escaped_path(&target)
                    ),
                });
            }
        }
        found.push(name);
    }
    found.sort();
    Ok(found)
}

/// Sorted (name, path, size) of the plain files in `dir` (hidden ones ignored).
fn files_in(dir: &Path) -> Result<Vec<(OsString, PathBuf, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        let path = entry.path();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let meta = std::fs::metadata(&path).at(&path)?;
        if meta.is_file() {
            out.push((name, path, meta.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// `path` relative to the input folder, for reports: distinct names read distinctly.
fn relative_name(root: &Path, path: &Path) -> String {
    escaped_path(path.strip_prefix(root).unwrap_or(path))
}

fn scan_class_folders(
    root: &Path,
    split: &str,
    dir: &Path,
    label_of: &HashMap<&str, u32>,
    out: Option<(u64, u64)>,
) -> Result<SplitInput> {
    let mut items = Vec::new();
    let mut refused = Vec::new();
    for folder in subdirs(dir, out)? {
        let Some(&label) = label_of.get(escaped(&folder).as_str()) else {
            return Err(Error::Input {
                path: dir.join(&folder),
                reason: "class folder is not one of the classes of train/".into(),
            });
        };
        for (_, path, size) in files_in(&dir.join(&folder))? {
            items.push(Item {
                name: relative_name(root, &path),
                label,
                origin: Origin::File(path),
                size,
            });
        }
    }
    for (_, path, _) in files_in(dir)? {
        refused.push(FileReport {
            split: split.into(),
            source: relative_name(root, &path),
            action: "rejected".into(),
            reason: "file lies outside the class folders, so it has no label".into(),
        });
    }
    Ok(SplitInput {
        name: split.into(),
        items,
        tfrecords: None,
        refused,
    })
}

fn scan_flat_val(
    root: &Path,
    dir: &Path,
    labels: &HashMap<String, String>,
    label_of: &HashMap<&str, u32>,
) -> Result<SplitInput> {
    let mut items = Vec::new();
    let mut refused = Vec::new();
    for (name, path, size) in files_in(dir)? {
        let stem = Path::new(&name)
            .file_stem()
            .map(escaped)
            .unwrap_or_default();
        let wnid = labels.get(&escaped(&name)).or_else(|| labels.get(&stem));
        match wnid.map(|w| (w, label_of.get(w.as_str()))) {
            Some((_, Some(&label))) => items.push(Item {
                name: relative_name(root, &path),
                label,
                origin: Origin::File(path),
                size,
            }),
            Some((w, None)) => {
                return Err(Error::Input {
                    path,
                    reason: format!(
                        "labels file gives class '{w}', which is not a class of train/"
                    ),
                })
            }
            None => refused.push(FileReport {
                split: "val".into(),
                source: relative_name(root, &path),
                action: "rejected".into(),
                reason: "no label for this file in the labels file".into(),
            }),
        }
    }
    Ok(SplitInput {
        name: "val".into(),
        items,
        tfrecords: None,
        refused,
    })
}

/// Reads validation labels: Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`
/// whose first token is the wnid) or lines of `file wnid` / `file,wnid`.
/// Keys are the file names or stems as written.
fn read_val_labels(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut labels = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (n == 0 && line.starts_with("ImageId")) {
            continue;
        }
        let mut parts = line.splitn(2, [',', ' ', '\t']);
        let (Some(file), Some(rest)) = (parts.next(), parts.next()) else {
            return Err(Error::Input {
                path: path.to_path_buf(),
                reason: format!("line {}: expected 'file,wnid' or 'file wnid'", n + 1),
            });
        };
        let wnid = rest.split_whitespace().next().unwrap_or_default();
        if wnid.is_empty() {
            return Err(Error::Input {
                path: path.to_path_buf(),
                reason: format!("line {}: no class after '{file}'", n + 1),
            });
        }
        labels.insert(file.trim().to_string(), wnid.to_string());
    }
    Ok(labels)
}

/// Human class names from `LOC_synset_mapping.txt` or `synset_words.txt`
/// (`n01440764 tench, Tinca tinca`), next to the input folder or one level up.
fn read_class_names(root: &Path) -> Result<HashMap<String, String>> {
    let found = ["LOC_synset_mapping.txt", "synset_words.txt"]
        .iter()
        .flat_map(|n| [root.join(n), root.join("..").join(n)])
        .find(|p| p.is_file());
    let Some(path) = found else {
        return Ok(HashMap::new());
    };
    let text = std::fs::read_to_string(&path).at(&path)?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .map(|(w, n)| (w.to_string(), n.trim().to_string()))
        .collect())
}

// ---------------------------------------------------------------------------------------
// TFRecords

fn scan_tfrecords(dir: &Path, label_offset: i64) -> Result<(Vec<ClassInfo>, Vec<SplitInput>)> {
    let mut splits = Vec::new();
    for (prefix, name) in [("train", "train"), ("validation", "val")] {
        // A folder may hold only one of the splits.
        let files = match list_tfrecord_files(dir, prefix) {
            Ok(f) => f,
            Err(_) => continue,
        };
        let source = TfRecordSource::open(&files, label_offset)?;
        let mut items = Vec::with_capacity(source.len());
        for i in 0..source.len() {
            let meta = source.meta(i)?;
            let (file, index) = source.locate(i)?;
            items.push(Item {
                name: format!(
                    "{}#{index}",
                    file.file_name().unwrap_or_default().to_string_lossy()
                ),
                label: meta.label,
                origin: Origin::TfRecord(i),
                size: u64::from(meta.len),
            });
        }
        splits.push(SplitInput {
            name: name.into(),
            items,
            tfrecords: Some(source),
            refused: Vec::new(),
        });
    }
    if splits.is_empty() {
        return Err(Error::Input {
            path: dir.to_path_buf(),
            reason: "no train-* or validation-* TFRecord files found".into(),
        });
    }
    // Class list: labels 0..=max; names from the first record of each label.
    let max_label = splits
        .iter()
        .flat_map(|s| s.items.iter().map(|i| i.label))
        .max()
        .unwrap_or(0);
    let mut classes: Vec<Option<ClassInfo>> = vec![None; max_label as usize + 1];
    for split in &splits {
        let Some(source) = &split.tfrecords else {
            continue;
        };
        for (i, item) in split.items.iter().enumerate() {
            let slot = &mut classes[item.label as usize];
            if slot.is_none() {
                let ex = source.example(i)?.example;
                let wnid = ex
                    .synset
                    .unwrap_or_else(|| format!("class{:04}", item.label));
                let name = ex.text.unwrap_or_else(|| wnid.clone());
                *slot = Some(ClassInfo { wnid, name });
            }
        }
    }
    let classes = classes
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            c.unwrap_or_else(|| ClassInfo {
                wnid: format!("class{i:04}"),
                name: format!("class{i:04}"),
            })
        })
        .collect();
    Ok((classes, splits))
}
