//! A packed dataset folder: the manifest plus its shards, with O(1) random access to
//! any record of a split.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::manifest::{shard_path, Manifest};
use crate::shard::ShardReader;
use crate::{Record, RecordMeta, RecordSource};

/// An opened dataset folder.
#[derive(Debug, Clone)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
}

impl Dataset {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::Input {
                path: dir,
                reason: "not a dataset folder (no such directory)".into(),
            });
        }
        let manifest = Manifest::load(&dir)?;
        Ok(Self { dir, manifest })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn num_classes(&self) -> usize {
        self.manifest.classes.len()
    }

    pub fn split_names(&self) -> impl Iterator<Item = &str> {
        self.manifest.splits.keys().map(String::as_str)
    }

    /// Maps every shard of `name` and checks each against the manifest.
    pub fn split(&self, name: &str) -> Result<SplitReader> {
        let manifest_path = self.dir.join(crate::manifest::MANIFEST_NAME);
        let info = self.manifest.split(name).ok_or_else(|| Error::Input {
            path: self.dir.clone(),
            reason: format!(
                "no split '{name}' (the dataset has: {})",
                self.manifest
                    .splits
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        let num_classes = self.manifest.classes.len() as u32;
        let mut shards = Vec::with_capacity(info.shards.len());
        // Not sized from the manifest's count: a corrupt count would abort on allocation.
        let mut table = Vec::new();
        for (s, shard_info) in info.shards.iter().enumerate() {
            let path = shard_path(&self.dir, shard_info);
            let reader = ShardReader::open(&path)?;
            if reader.len() as u64 != shard_info.records {
                return Err(Error::CorruptShard {
                    path,
                    reason: format!(
                        "holds {} records, {} says {}",
                        reader.len(),
                        manifest_path.display(),
                        shard_info.records
                    ),
                });
            }
            if let Some((i, e)) = reader
                .entries()
                .iter()
                .enumerate()
                .find(|(_, e)| e.label >= num_classes)
            {
                return Err(Error::CorruptRecord {
                    path,
                    index: i as u64,
                    reason: format!(
                        "label {} but the dataset has {num_classes} classes",
                        e.label
                    ),
                });
            }
            table.extend((0..reader.len() as u32).map(|i| (s as u32, i)));
            shards.push(reader);
        }
        Ok(SplitReader {
            name: name.to_string(),
            shards,
            table,
        })
    }
}

/// All records of one split, addressable by a global index.
#[derive(Debug)]
pub struct SplitReader {
    name: String,
    shards: Vec<ShardReader>,
    /// Global index -> (shard, index in shard): one lookup, no search.
    table: Vec<(u32, u32)>,
}

impl SplitReader {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shards(&self) -> &[ShardReader] {
        &self.shards
    }

    fn resolve(&self, i: usize) -> Result<(&ShardReader, usize)> {
        let &(s, local) = self.table.get(i).ok_or(Error::IndexOutOfRange {
            index: i as u64,
            len: self.table.len() as u64,
        })?;
        Ok((&self.shards[s as usize], local as usize))
    }
}

impl RecordSource for SplitReader {
    fn len(&self) -> usize {
        self.table.len()
    }

    fn meta(&self, i: usize) -> Result<RecordMeta> {
        let (shard, local) = self.resolve(i)?;
        Ok(shard.entry(local)?.meta())
    }

    fn record(&self, i: usize) -> Result<Record> {
        let (shard, local) = self.resolve(i)?;
        shard.record(local)
    }

    fn record_unchecked(&self, i: usize) -> Result<Record> {
        let (shard, local) = self.resolve(i)?;
        let e = shard.entry(local)?;
        Ok(Record {
            data: shard.record_bytes_unchecked(local)?,
            label: e.label,
            width: e.width,
            height: e.height,
        })
    }

    fn locate(&self, i: usize) -> Result<(PathBuf, u64)> {
        let (shard, local) = self.resolve(i)?;
        Ok((shard.path().to_path_buf(), local as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest's counts are not trusted for allocation: a huge one used to abort the
    /// process (`Vec::with_capacity`) before any shard was looked at.
    #[test]
    fn huge_record_count_is_an_error_not_an_abort() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = r#"{"format": "convnets-dataset", "version": 1,
            "classes": [{"wnid": "n01440764", "name": "tench"}],
            "splits": {"train": {"records": 1000000000000, "shards": [
                {"file": "train-00000-of-00001.cnr", "records": 1000000000000, "bytes": 1, "crc32c": 0}]}}}"#;
        std::fs::write(dir.path().join(crate::manifest::MANIFEST_NAME), manifest).unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        assert!(ds.split("train").is_err());
    }
}
