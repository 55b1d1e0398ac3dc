//! The dataset manifest (`manifest.json`): format version, classes, and per split the
//! list of shards with their record counts, sizes and checksums.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

pub const MANIFEST_NAME: &str = "manifest.json";
pub const FORMAT_NAME: &str = "convnets-dataset";
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `convnets-dataset`.
    pub format: String,
    pub version: u32,
    /// Classes in label order: record label `i` is `classes[i]`.
    pub classes: Vec<ClassInfo>,
    pub splits: BTreeMap<String, SplitInfo>,
    /// How the dataset was made (tool, source, seed, options); informational.
    #[serde(default)]
    pub created_by: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassInfo {
    /// WordNet id, e.g. `n01440764`.
    pub wnid: String,
    /// Human-readable name, e.g. `tench, Tinca tinca` (the wnid when unknown).
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub records: u64,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the dataset folder (never a path).
    pub file: String,
    pub records: u64,
    pub bytes: u64,
    /// CRC32C of the whole file.
    pub crc32c: u32,
}

impl Manifest {
    pub fn new(classes: Vec<ClassInfo>) -> Self {
        Self {
            format: FORMAT_NAME.into(),
            version: MANIFEST_VERSION,
            classes,
            splits: BTreeMap::new(),
            created_by: serde_json::Value::Null,
        }
    }

    /// Reads and validates `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_NAME);
        let text = std::fs::read(&path).at(&path)?;
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        m.validate(&path)?;
        Ok(m)
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_NAME);
        self.validate(&path)?;
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        text.push(b'\n');
        crate::atomic::write_atomic(&path, &text)
    }

    /// Structural checks: version, consistent counts, shard names that stay inside the
    /// dataset folder, labels that name a class.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::Manifest {
            path: path.to_path_buf(),
            reason,
        };
        if self.format != FORMAT_NAME {
            return Err(bad(format!(
                "format is '{}', expected '{FORMAT_NAME}'",
                self.format
            )));
        }
        if self.version != MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                what: "manifest",
                found: self.version,
                supported: MANIFEST_VERSION,
            });
        }
        let mut files = std::collections::HashSet::new();
        for (name, split) in &self.splits {
            check_plain_name(name).map_err(|r| bad(format!("split name '{name}' {r}")))?;
            // Checked: counts come from the file, and a wrapped sum could match anything.
            let sum = split
                .shards
                .iter()
                .try_fold(0u64, |acc, s| acc.checked_add(s.records));
            if sum != Some(split.records) {
                let held = sum.map_or_else(|| "2^64 or more".to_string(), |n| n.to_string());
                return Err(bad(format!(
                    "split '{name}' says {} records but its shards hold {held}",
                    split.records
                )));
            }
            for s in &split.shards {
                check_plain_name(&s.file)
                    .map_err(|r| bad(format!("shard path '{}' {r}", s.file)))?;
                if !files.insert(s.file.as_str()) {
                    return Err(bad(format!("shard '{}' is listed twice", s.file)));
                }
            }
        }
        Ok(())
    }

    pub fn split(&self, name: &str) -> Option<&SplitInfo> {
        self.splits.get(name)
    }
}

/// A shard or split name must be a single plain file name, so a manifest can never make
/// us open a file outside the dataset folder.
fn check_plain_name(name: &str) -> std::result::Result<(), &'static str> {
    let p = Path::new(name);
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && p.components().count() == 1
        && !p.is_absolute();
    if plain {
        Ok(())
    } else {
        Err("is outside the dataset folder (must be a plain file name)")
    }
}

/// Full path of a shard listed in a validated manifest.
pub fn shard_path(dir: &Path, shard: &ShardInfo) -> PathBuf {
    dir.join(&shard.file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new(vec![ClassInfo {
            wnid: "n01440764".into(),
            name: "tench".into(),
        }]);
        m.splits.insert(
            "train".into(),
            SplitInfo {
                records: 3,
                shards: vec![ShardInfo {
                    file: "train-00000-of-00001.cnr".into(),
                    records: 3,
                    bytes: 100,
                    crc32c: 7,
                }],
            },
        );
        m
    }

    #[test]
    fn save_load_round_trip() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.save(dir.path())?;
        assert_eq!(Manifest::load(dir.path())?, m);
        Ok(())
    }

    #[test]
    fn paths_outside_the_folder_are_refused() {
        for evil in ["../x.cnr", "/etc/passwd", "a/b.cnr", "..", "", "a\\b"] {
            let mut m = sample();
            m.splits.get_mut("train").unwrap().shards[0].file = evil.into();
            let e = m.validate(Path::new("m.json")).unwrap_err();
            assert!(
                e.to_string().contains("outside the dataset folder"),
                "{evil}: {e}"
            );
        }
    }

    #[test]
    fn inconsistent_counts_and_versions_are_refused() {
        let mut m = sample();
        m.splits.get_mut("train").unwrap().records = 4;
        assert!(m.validate(Path::new("m.json")).is_err());
        let mut m = sample();
        m.version = 99;
        assert!(matches!(
            m.validate(Path::new("m.json")),
            Err(Error::UnsupportedVersion { found: 99, .. })
        ));
    }

    /// Found by `fuzz/` (target `manifest`): the sum of shard counts overflowed.
    #[test]
    fn overflowing_counts_are_refused() {
        let mut m = sample();
        let split = m.splits.get_mut("train").unwrap();
        split.shards[0].records = u64::MAX;
        let mut second = split.shards[0].clone();
        second.file = "train-extra.cnr".into();
        second.records = 1;
        split.shards.push(second);
        split.records = 0; // what a wrapping sum would give
        let e = m.validate(Path::new("m.json")).unwrap_err();
        assert!(e.to_string().contains("2^64 or more"), "{e}");
    }

    #[test]
    fn garbage_manifest_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST_NAME), b"{not json").unwrap();
        let e = Manifest::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("manifest.json"), "{e}");
    }
}
