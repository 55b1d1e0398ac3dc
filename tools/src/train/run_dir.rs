//! The run folder: `args.json` (how the run was started), `log.jsonl`, `summary.json` and
//! `checkpoints/step-NNNNNNNN/` + `checkpoints/best/`, each checkpoint written to a temporary
//! folder and renamed into place, so a crash never leaves a half checkpoint under a real name.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tch::nn::VarStore;

use super::sgd::Sgd;
use super::{TrainArgs, TrainState};
use crate::checkpoint::{self, CheckpointMeta};

pub const OPTIMIZER_NAME: &str = "optimizer.safetensors";
const STATE_NAME: &str = "state.json";
const ARGS_NAME: &str = "args.json";
const LOG_NAME: &str = "log.jsonl";
const SUMMARY_NAME: &str = "summary.json";

pub struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// Starts a new run; refuses a folder that already holds one.
    pub fn create(&self, args: &TrainArgs) -> anyhow::Result<()> {
        if self.dir.join(ARGS_NAME).exists() {
            bail!("{} already holds a run: pass --resume to continue it, or choose another --output", self.dir.display());
        }
        std::fs::create_dir_all(self.checkpoints()).with_context(|| format!("creating {}", self.dir.display()))?;
        let text = serde_json::to_vec_pretty(args)?;
        convnets_formats::atomic::write_atomic(&self.dir.join(ARGS_NAME), &text)?;
        Ok(())
    }

    pub fn load_args(&self) -> anyhow::Result<TrainArgs> {
        let path = self.dir.join(ARGS_NAME);
        let text = std::fs::read(&path).with_context(|| format!("--resume: reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{}: not a run description", path.display()))
    }

    /// The log, opened for appending; lines past `step` (written after the checkpoint a
    /// resumed run starts from) are dropped so the log tells one consistent story.
    pub fn open_log(&self, step: u64) -> anyhow::Result<std::fs::File> {
        let path = self.dir.join(LOG_NAME);
        if step > 0 && path.exists() {
            let file = std::fs::File::open(&path)?;
            let mut kept = Vec::new();
            for line in std::io::BufReader::new(file).lines() {
                let line = line?;
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["step"].as_u64().is_none_or(|s| s <= step) {
                    kept.extend_from_slice(line.as_bytes());
                    kept.push(b'\n');
                }
            }
            convnets_formats::atomic::write_atomic(&path, &kept)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    pub fn write_summary(&self, summary: &serde_json::Value) -> anyhow::Result<()> {
        let mut text = serde_json::to_vec_pretty(summary)?;
        text.push(b'\n');
        convnets_formats::atomic::write_atomic(&self.dir.join(SUMMARY_NAME), &text)?;
        Ok(())
    }

    /// The newest complete checkpoint and its state.
    pub fn latest(&self) -> anyhow::Result<Option<(PathBuf, TrainState)>> {
        let mut best: Option<(u64, PathBuf)> = None;
        let Ok(entries) = std::fs::read_dir(self.checkpoints()) else { return Ok(None) };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(step) = name.strip_prefix("step-").and_then(|n| n.parse::<u64>().ok()) else { continue };
            if entry.path().join(STATE_NAME).is_file() && best.as_ref().is_none_or(|(s, _)| step > *s) {
                best = Some((step, entry.path()));
            }
        }
        match best {
            None => Ok(None),
            Some((_, dir)) => {
                let path = dir.join(STATE_NAME);
                let state = serde_json::from_slice(&std::fs::read(&path)?)
                    .with_context(|| format!("{}: unreadable training state", path.display()))?;
                Ok(Some((dir, state)))
            }
        }
    }

    pub fn save_checkpoint(
        &self,
        vs: &VarStore,
        sgd: &Sgd,
        meta: &CheckpointMeta,
        state: &TrainState,
        is_best: bool,
        keep_last: usize,
    ) -> anyhow::Result<()> {
        let root = self.checkpoints();
        let name = format!("step-{:08}", state.step);
        let tmp = root.join(format!("{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        checkpoint::save(&tmp, vs, meta)?;
        sgd.save(&tmp.join(OPTIMIZER_NAME))?;
        let mut f = std::fs::File::create(tmp.join(STATE_NAME))?;
        f.write_all(&serde_json::to_vec_pretty(state)?)?;
        f.sync_all()?;
        replace_dir(&tmp, &root.join(&name))?;
        if is_best {
            let best_tmp = root.join("best.tmp");
            if best_tmp.exists() {
                std::fs::remove_dir_all(&best_tmp)?;
            }
            std::fs::create_dir_all(&best_tmp)?;
            for entry in std::fs::read_dir(root.join(&name))? {
                let entry = entry?;
                std::fs::copy(entry.path(), best_tmp.join(entry.file_name()))?;
            }
            replace_dir(&best_tmp, &root.join("best"))?;
        }
        // Keep the newest `keep_last` checkpoints (at least the one just written).
        let mut epochs: Vec<PathBuf> = std::fs::read_dir(&root)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-") && !n.ends_with(".tmp"))
            })
            .collect();
        epochs.sort();
        let keep = keep_last.max(1);
        for old in epochs.iter().take(epochs.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    }
}

/// Moves `from` to `to`, replacing an older `to`.
fn replace_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    if to.exists() {
        let old = to.with_extension("old");
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(to, &old)?;
        std::fs::rename(from, to)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(from, to)?;
    }
    Ok(())
}
