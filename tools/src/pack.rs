//! `convnets pack-imagenet`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use convnets_formats::names::escaped_path;
use convnets_pack::pack::{self, PackOptions, PackProgress, PackSource, ShardSizing};
use convnets_pack::sanitize::{AwkwardPolicy, SanitizeOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::units::{format_bytes, parse_bytes};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormat {
    /// A TFRecord folder if it holds `train-*`/`validation-*` files, else an image folder.
    Auto,
    /// `train/<wnid>/*.JPEG` and `val/`.
    Folder,
    /// TFRecords from TensorFlow's `build_imagenet_data.py`.
    Tfrecord,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Awkward {
    /// Re-encode as baseline RGB JPEG.
    Reencode,
    /// Leave out (and report).
    Skip,
}

#[derive(Debug, Args)]
pub struct PackArgs {
    /// ImageNet folder (train/<wnid>/*.JPEG, val/) or TFRecord folder.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Dataset folder to create (or to resume into).
    #[arg(long, short)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
    pub format: InputFormat,
    /// Labels for a flat val/ folder (LOC_val_solution.csv, or lines of `file wnid`).
    #[arg(long)]
    pub val_labels: Option<PathBuf>,
    /// Subtracted from TFRecord labels (build_imagenet_data.py labels start at 1).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub label_offset: i64,
    /// Number of train shards (with --val-shards; instead of --shard-size).
    #[arg(long, requires = "val_shards", conflicts_with = "shard_size")]
    pub train_shards: Option<usize>,
    /// Number of val shards.
    #[arg(long, requires = "train_shards")]
    pub val_shards: Option<usize>,
    /// Target shard size, e.g. 128MiB.
    #[arg(long, default_value = "128MiB", value_parser = parse_bytes)]
    pub shard_size: u64,
    /// Seed of the shuffle of records across shards.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Re-encode images whose long side exceeds N pixels down to N.
    #[arg(long)]
    pub max_side: Option<u32>,
    /// JPEG quality of re-encoded images.
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: u8,
    /// Refuse images with more pixels than this, before decoding (decompression bombs).
    #[arg(long, default_value_t = SanitizeOptions::default().max_pixels)]
    pub max_pixels: u64,
    /// Refuse input files larger than this without reading them.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub max_file_size: u64,
    /// What to do with CMYK, grayscale, progressive, PNG and other awkward images.
    #[arg(long, value_enum, default_value_t = Awkward::Reencode)]
    pub awkward: Awkward,
    /// Skip the strict libjpeg-turbo decode of JPEGs (faster; corrupt entropy data goes unnoticed).
    #[arg(long)]
    pub no_decode_check: bool,
    /// Fail on the first file that cannot be stored as is or re-encoded.
    #[arg(long)]
    pub strict: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(a: PackArgs) -> anyhow::Result<()> {
    let format = match a.format {
        InputFormat::Auto if looks_like_tfrecords(&a.input) => InputFormat::Tfrecord,
        InputFormat::Auto => InputFormat::Folder,
        f => f,
    };
    let source = match format {
        InputFormat::Tfrecord => PackSource::TfRecords {
            dir: a.input.clone(),
            label_offset: a.label_offset,
        },
        _ => PackSource::ImageFolder {
            root: a.input.clone(),
            val_labels: a.val_labels.clone(),
        },
    };
    if a.max_side == Some(0) {
        bail!("--max-side must be at least 1");
    }
    let opts = PackOptions {
        seed: a.seed,
        sizing: match (a.train_shards, a.val_shards) {
            (Some(train), Some(val)) if train > 0 && val > 0 => ShardSizing::Count { train, val },
            (Some(_), Some(_)) => bail!("--train-shards and --val-shards must be at least 1"),
            _ => ShardSizing::TargetBytes(a.shard_size),
        },
        sanitize: SanitizeOptions {
            max_pixels: a.max_pixels,
            max_side: a.max_side,
            awkward: match a.awkward {
                Awkward::Reencode => AwkwardPolicy::Reencode,
                Awkward::Skip => AwkwardPolicy::Skip,
            },
            quality: a.quality,
            verify_decode: !a.no_decode_check,
        },
        threads: a.threads,
        strict: a.strict,
        max_file_bytes: a.max_file_size,
    };
    let progress = Bar::new(a.quiet);
    let report = pack::pack(&source, &a.output, &opts, &progress).with_context(|| {
        format!(
            "packing {} into {}",
            escaped_path(&a.input),
            escaped_path(&a.output)
        )
    })?;

    if !a.quiet {
        for (name, s) in &report.splits {
            println!(
                "{name}: {} records in {} shards ({} kept as is, {} re-encoded, {} skipped, {} rejected{})",
                s.records,
                s.shards,
                s.kept,
                s.reencoded,
                s.skipped,
                s.rejected,
                if s.resumed_shards > 0 {
                    format!("; {} shards kept from an earlier run", s.resumed_shards)
                } else {
                    String::new()
                }
            );
        }
        let size: u64 = std::fs::read_dir(&a.output)
            .with_context(|| format!("reading {}", escaped_path(&a.output)))?
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
        println!("wrote {} ({})", escaped_path(&a.output), format_bytes(size));
        if !report.files.is_empty() {
            println!(
                "{} files were not stored as is; each is listed in {}",
                report.files.len(),
                escaped_path(&a.output.join(pack::REPORT_NAME))
            );
        }
    }
    Ok(())
}

fn looks_like_tfrecords(dir: &std::path::Path) -> bool {
    ["train", "validation"]
        .iter()
        .any(|p| convnets_formats::tfrecord::list_tfrecord_files(dir, p).is_ok())
}

/// An indicatif bar, drawn only on a terminal.
struct Bar(ProgressBar);

impl Bar {
    fn new(quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>5} [{bar:40}] {pos}/{len} images {per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Self(bar)
    }
}

impl PackProgress for Bar {
    fn split_started(&self, split: &str, records: u64, already_done: u64) {
        self.0.reset();
        self.0.set_prefix(split.to_string());
        self.0.set_length(records);
        self.0.set_position(already_done);
    }
    fn advanced(&self, records: u64) {
        self.0.inc(records);
    }
    fn split_finished(&self, _split: &str) {
        self.0.finish_and_clear();
    }
}
