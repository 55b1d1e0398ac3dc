//! `verify`: reads every byte of a dataset and reports each damaged shard or record by
//! name and index, instead of stopping at the first.

use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::manifest::{shard_path, ShardInfo};
use crate::shard::ShardReader;

/// Decodes one stored image and returns its width and height, or why it is not a record
/// the loader takes. The packer's check (`convnets_pack::sanitize::check_stored`) is the
/// one `convnets verify --decode` uses; it lives there because it needs image codecs.
pub type ImageCheck = fn(&[u8]) -> std::result::Result<(u32, u32), String>;

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Also decode every image with this check (slow): catches damage that the CRCs cannot,
    /// such as a record that was already broken when it was packed with checks turned off.
    pub decode: Option<ImageCheck>,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damage {
    pub split: String,
    pub file: String,
    /// Record index within the shard; None when the shard as a whole is bad.
    pub record: Option<u64>,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub shards: u64,
    pub records: u64,
    pub bytes: u64,
    pub damage: Vec<Damage>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Checks every shard of every split of the dataset at `dir`.
pub fn verify(dir: &Path, opts: &VerifyOptions) -> Result<VerifyReport> {
    let ds = Dataset::open(dir)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start worker threads: {e}")))?;
    let jobs: Vec<(&str, &ShardInfo)> = ds
        .manifest()
        .splits
        .iter()
        .flat_map(|(name, split)| split.shards.iter().map(move |s| (name.as_str(), s)))
        .collect();
    let num_classes = ds.num_classes() as u32;
    let results: Vec<VerifyReport> = pool.install(|| {
        jobs.par_iter()
            .map(|(split, info)| verify_shard(dir, split, info, num_classes, opts))
            .collect()
    });
    let mut total = VerifyReport::default();
    for r in results {
        total.shards += r.shards;
        total.records += r.records;
        total.bytes += r.bytes;
        total.damage.extend(r.damage);
    }
    Ok(total)
}

fn verify_shard(
    dir: &Path,
    split: &str,
    info: &ShardInfo,
    num_classes: u32,
    opts: &VerifyOptions,
) -> VerifyReport {
    let mut report = VerifyReport {
        shards: 1,
        ..Default::default()
    };
    let damage = |record: Option<u64>, reason: String| Damage {
        split: split.to_string(),
        file: info.file.clone(),
        record,
        reason,
    };
    let reader = match ShardReader::open(&shard_path(dir, info)) {
        Ok(r) => r,
        Err(e) => {
            let record = match &e {
                Error::CorruptRecord { index, .. } => Some(*index),
                _ => None,
            };
            report.damage.push(damage(record, e.to_string()));
            return report;
        }
    };
    report.bytes = reader.file_len();
    if reader.file_len() != info.bytes {
        let reason = format!(
            "file is {} bytes, manifest says {}",
            reader.file_len(),
            info.bytes
        );
        report.damage.push(damage(None, reason));
    }
    if reader.len() as u64 != info.records {
        let reason = format!(
            "holds {} records, manifest says {}",
            reader.len(),
            info.records
        );
        report.damage.push(damage(None, reason));
    }
    let crc = reader.file_crc32c();
    if crc != info.crc32c {
        let reason = format!(
            "file CRC32C is {crc:#010x}, manifest says {:#010x}",
            info.crc32c
        );
        report.damage.push(damage(None, reason));
    }
    for i in 0..reader.len() {
        report.records += 1;
        let result = reader.record(i).and_then(|rec| {
            if rec.label >= num_classes {
                return Err(Error::Invalid(format!(
                    "label {} but the dataset has {num_classes} classes",
                    rec.label
                )));
            }
            if let Some(check) = opts.decode {
                let (width, height) = check(&rec.data).map_err(Error::Invalid)?;
                if (width, height) != (rec.width, rec.height) {
                    return Err(Error::Invalid(format!(
                        "image is {width}x{height}, index says {}x{}",
                        rec.width, rec.height
                    )));
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            report.damage.push(damage(Some(i as u64), e.to_string()));
        }
    }
    report
}
