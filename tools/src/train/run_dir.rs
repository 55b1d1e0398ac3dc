//! The run folder: `args.json` (how the run was started), `log.jsonl`, `summary.json` and
//! `checkpoints/step-NNNNNNNN/`, each checkpoint written to a temporary folder and renamed
//! into place, so a crash never leaves a half checkpoint under a real name.
//!
//! `checkpoints/best` is a relative symlink to the finished `step-N` of the best evaluation,
//! which keep-last never removes. Each checkpoint's `state.json` names the best step
//! (`best_step`), so the pointer can be checked against the latest checkpoint: a process
//! killed between the rename of `step-N` and the pointer's update leaves a pointer that the
//! next start ([`RunDir::tidy`]) repairs, together with `*.tmp` leftovers and checkpoints
//! beyond `--keep-last`. `best` therefore always holds the `best_top1` of the summary.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use super::log::LogRecord;
use super::sgd::Sgd;
use super::{TrainArgs, TrainState};
use crate::checkpoint::{self, CheckpointMeta};

pub const OPTIMIZER_NAME: &str = "optimizer.safetensors";
const STATE_NAME: &str = "state.json";
const ARGS_NAME: &str = "args.json";
const LOG_NAME: &str = "log.jsonl";
const SUMMARY_NAME: &str = "summary.json";
const LOCK_NAME: &str = ".lock";

/// The run folder's lock, held while alive.
pub type RunLock = convnets_formats::lock::FileLock;

pub struct RunDir {
    dir: PathBuf,
}

impl RunDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// Takes the run folder for this process (created if missing): a second `train` on the
    /// same folder is refused while this one lives. The lock is the kernel's (`flock`) on
    /// `.lock`, so it goes with the process however it ends; the file holds the PID.
    pub fn lock(&self) -> anyhow::Result<RunLock> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        match RunLock::acquire(&self.dir.join(LOCK_NAME)) {
            Err(convnets_formats::Error::Locked { pid, .. }) => bail!(
                "{} is in use by another convnets train (PID {pid}); wait for it to end or stop it first",
                self.dir.display()
            ),
            other => Ok(other?),
        }
    }

    /// Clears what an attempt that never finished a checkpoint left (log, summary,
    /// temporary checkpoint folders), so the run starts over from a clean folder.
    pub fn restart(&self) -> anyhow::Result<()> {
        for name in [LOG_NAME, SUMMARY_NAME] {
            let path = self.dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.checkpoints()) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".tmp") {
                    remove_any(&entry.path())?;
                }
            }
        }
        Ok(())
    }

    /// Starts a new run; refuses a folder that already holds one.
    pub fn create(&self, args: &TrainArgs) -> anyhow::Result<()> {
        if self.dir.join(ARGS_NAME).exists() {
            bail!(
                "{} already holds a run: pass --resume to continue it (from its last checkpoint, or from the \
                 start when it has none), or choose another --output",
                self.dir.display()
            );
        }
        std::fs::create_dir_all(self.checkpoints())
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let text = serde_json::to_vec_pretty(args)?;
        convnets_formats::atomic::write_atomic(&self.dir.join(ARGS_NAME), &text)?;
        Ok(())
    }

    pub fn load_args(&self) -> anyhow::Result<TrainArgs> {
        let path = self.dir.join(ARGS_NAME);
        let text = std::fs::read(&path)
            .with_context(|| format!("--resume: reading {}", path.display()))?;
        serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a run description", path.display()))
    }

    /// The log, opened for appending; lines past `step` (written after the checkpoint a
    /// resumed run starts from) are dropped so the log tells one consistent story.
    pub fn open_log(&self, step: u64) -> anyhow::Result<std::fs::File> {
        let path = self.log_path();
        if step > 0 && path.exists() {
            let read_err = || format!("reading {}", path.display());
            let file = std::fs::File::open(&path).with_context(read_err)?;
            let mut kept = Vec::new();
            for line in std::io::BufReader::new(file).lines() {
                let line = line.with_context(read_err)?;
                // A line that is not a record (a torn last line) is kept as it is.
                let record_step = LogRecord::parse(&line)
                    .ok()
                    .flatten()
                    .and_then(|r| r.step());
                if record_step.is_none_or(|s| s <= step) {
                    kept.extend_from_slice(line.as_bytes());
                    kept.push(b'\n');
                }
            }
            convnets_formats::atomic::write_atomic(&path, &kept)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_NAME)
    }

    pub fn write_summary(&self, summary: &serde_json::Value) -> anyhow::Result<()> {
        let mut text = serde_json::to_vec_pretty(summary)?;
        text.push(b'\n');
        let path = self.dir.join(SUMMARY_NAME);
        convnets_formats::atomic::write_atomic(&path, &text)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The newest complete checkpoint and its state.
    pub fn latest(&self) -> anyhow::Result<Option<(PathBuf, TrainState)>> {
        let Some(dir) = checkpoint::latest_step(&self.checkpoints())? else {
            return Ok(None);
        };
        let state = read_state(&dir)?;
        Ok(Some((dir, state)))
    }

    /// Puts `checkpoints/` back in the shape a finished write leaves, after a process that
    /// was killed (or ran out of disk) in the middle of one: removes `*.tmp` and `*.old`
    /// leftovers, points `best` at the checkpoint the latest state names as best, and
    /// removes checkpoints beyond `keep_last` (never the best one). Says what it repaired.
    pub fn tidy(&self, keep_last: usize) -> anyhow::Result<()> {
        let root = self.checkpoints();
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", root.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || name.ends_with(".old") {
                eprintln!(
                    "removing {}, left by a write that did not finish",
                    entry.path().display()
                );
                remove_any(&entry.path())?;
            }
        }
        let Some((latest, state)) = self.latest()? else {
            return Ok(());
        };
        let best = root.join(checkpoint::BEST_NAME);
        let pointed = checkpoint::best_step(&root)?;
        match state.best_step {
            Some(step) if pointed != Some(step) => {
                let name = checkpoint::step_name(step);
                if root.join(&name).join(checkpoint::META_NAME).is_file() {
                    eprintln!(
                        "{}: pointing it at {name}, the best checkpoint according to {}",
                        best.display(),
                        latest.display()
                    );
                    point_best(&root, &name)?;
                } else {
                    // Only a checkpoint removed by hand can be missing: no pointer is
                    // better than one to other weights than the summary's.
                    eprintln!(
                        "{}: {name}, the best checkpoint according to {}, is gone; removing the pointer",
                        best.display(),
                        latest.display()
                    );
                    remove_any(&best)?;
                }
            }
            Some(_) => {}
            None if best.symlink_metadata().is_ok() => {
                // A run started before `best` became a pointer: its copy is kept when it
                // holds the latest state's best evaluation.
                let copy = read_state(&best).ok();
                if copy.is_none_or(|c| c.best_top1 != state.best_top1) {
                    eprintln!(
                        "{}: not the best checkpoint according to {}; removing it",
                        best.display(),
                        latest.display()
                    );
                    remove_any(&best)?;
                }
            }
            None => {}
        }
        prune(&root, keep_last, state.best_step)
    }

    /// Everything checkpoint `step-N` of `state` holds, copied to host memory: on a GPU
    /// the copies are queued behind the last step (into pinned memory) and a fence after
    /// them is what the writer waits for, so the training loop does not wait at all.
    /// Written by [`CheckpointWriter`] while training goes on.
    pub fn snapshot(
        &self,
        vs: &VarStore,
        sgd: &Sgd,
        meta: &CheckpointMeta,
        state: &TrainState,
        keep_last: usize,
    ) -> anyhow::Result<Snapshot> {
        let _guard = tch::no_grad_guard();
        let copy = |named: Vec<(String, Tensor)>| -> anyhow::Result<Vec<(String, Tensor)>> {
            named
                .into_iter()
                .map(|(name, t)| {
                    Ok((
                        name,
                        t.f_detach()?
                            .f_to_device_(Device::Cpu, t.kind(), true, true)?,
                    ))
                })
                .collect()
        };
        let mut model = copy(vs.variables().into_iter().collect())?;
        model.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tensors = vec![
            (checkpoint::MODEL_NAME, model),
            (OPTIMIZER_NAME, copy(sgd.momentum_views())?),
        ];
        let ema = sgd.ema_views();
        if !ema.is_empty() {
            tensors.push((checkpoint::EMA_NAME, copy(ema)?));
        }
        #[cfg(feature = "cuda")]
        let fence = match vs.device() {
            Device::Cuda(i) => Some(crate::torch_ext::cuda::Fence::record(i)?),
            _ => None,
        };
        let mut meta = serde_json::to_vec_pretty(meta)?;
        meta.push(b'\n');
        Ok(Snapshot {
            root: self.checkpoints(),
            name: checkpoint::step_name(state.step),
            tensors,
            files: vec![
                (checkpoint::META_NAME, meta),
                (STATE_NAME, serde_json::to_vec_pretty(state)?),
            ],
            is_best: state.best_step == Some(state.step),
            best_step: state.best_step,
            keep_last,
            #[cfg(feature = "cuda")]
            fence,
        })
    }
}

/// A checkpoint in host memory, not yet on disk.
pub struct Snapshot {
    root: PathBuf,
    name: String,
    tensors: Vec<(&'static str, Vec<(String, Tensor)>)>,
    files: Vec<(&'static str, Vec<u8>)>,
    /// This checkpoint becomes `best`.
    is_best: bool,
    /// The best checkpoint's step, which pruning keeps.
    best_step: Option<u64>,
    keep_last: usize,
    /// Passed once the device-to-host copies are done.
    #[cfg(feature = "cuda")]
    fence: Option<crate::torch_ext::cuda::Fence>,
}

impl Snapshot {
    /// Writes `NAME.tmp/` (every file fsynced), renames it to `NAME` (so the previous
    /// checkpoint stays the latest until the new one is whole), points `best` at it when it
    /// is, and removes all but the newest `keep_last` (and the best). Returns the
    /// checkpoint's folder.
    pub fn write(&self) -> anyhow::Result<PathBuf> {
        #[cfg(feature = "cuda")]
        if let Some(fence) = &self.fence {
            fence.wait()?;
        }
        let tmp = self.root.join(format!("{}.tmp", self.name));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        for (file, tensors) in &self.tensors {
            let path = tmp.join(file);
            // channels_last weights are written in the standard (NCHW) order.
            let tensors = tensors
                .iter()
                .map(|(n, t)| Ok((n.as_str(), t.f_contiguous()?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Tensor::write_safetensors(&tensors, &path)
                .with_context(|| format!("writing {}", path.display()))?;
            sync_file(&path)?;
        }
        for (file, bytes) in &self.files {
            let path = tmp.join(file);
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            sync_file(&path)?;
        }
        let dir = self.root.join(&self.name);
        replace_dir(&tmp, &dir)?;
        if self.is_best {
            point_best(&self.root, &self.name)?;
        }
        prune(&self.root, self.keep_last, self.best_step)?;
        Ok(dir)
    }
}

fn read_state(dir: &Path) -> anyhow::Result<TrainState> {
    let path = dir.join(STATE_NAME);
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{}: unreadable training state", path.display()))
}

/// Points `root/best` at the finished checkpoint `name`: a relative symlink made as
/// `best.tmp` and renamed over the old one (atomic); a `best` folder of older runs (a copy)
/// is removed first.
fn point_best(root: &Path, name: &str) -> anyhow::Result<()> {
    let best = root.join(checkpoint::BEST_NAME);
    let tmp = root.join(format!("{}.tmp", checkpoint::BEST_NAME));
    remove_any(&tmp)?;
    std::os::unix::fs::symlink(name, &tmp)
        .with_context(|| format!("creating {} -> {name}", tmp.display()))?;
    if best.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        remove_any(&best)?;
    }
    std::fs::rename(&tmp, &best)
        .with_context(|| format!("renaming {} to {}", tmp.display(), best.display()))?;
    sync_dir(root)
}

/// Removes all but the newest `keep_last` (at least one) `step-N` checkpoints, except the
/// best one.
fn prune(root: &Path, keep_last: usize, best_step: Option<u64>) -> anyhow::Result<()> {
    let steps = checkpoint::step_dirs(root)?;
    let keep = keep_last.max(1);
    for (step, old) in steps.iter().take(steps.len().saturating_sub(keep)) {
        if Some(*step) != best_step {
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    Ok(())
}

/// Removes a file, symlink or folder; one that is not there is no error.
fn remove_any(path: &Path) -> anyhow::Result<()> {
    let result = match path.symlink_metadata() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    result.with_context(|| format!("removing {}", path.display()))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

fn sync_file(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes checkpoints on a thread of its own, one at a time, so an epoch boundary costs
/// the host copy only. A failed write is returned by the next [`CheckpointWriter::submit`]
/// or by [`CheckpointWriter::wait`]; dropping the writer waits for a write in flight.
pub struct CheckpointWriter {
    jobs: Option<std::sync::mpsc::SyncSender<Snapshot>>,
    results: std::sync::mpsc::Receiver<anyhow::Result<PathBuf>>,
    in_flight: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Default for CheckpointWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CheckpointWriter {
    pub fn new() -> Self {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Snapshot>(1);
        let (done, results) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for snapshot in queue {
                    if done.send(snapshot.write()).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the checkpoint writer thread");
        Self {
            jobs: Some(jobs),
            results,
            in_flight: false,
            thread: Some(thread),
        }
    }

    /// Queues `snapshot` after the write in flight, whose error (if any) it returns.
    pub fn submit(&mut self, snapshot: Snapshot) -> anyhow::Result<()> {
        self.wait()?;
        let jobs = self
            .jobs
            .as_ref()
            .context("the checkpoint writer has stopped")?;
        jobs.send(snapshot)
            .map_err(|_| anyhow::anyhow!("the checkpoint writer thread has stopped"))?;
        self.in_flight = true;
        Ok(())
    }

    /// Waits for the write in flight; its folder, or `None` when there was none.
    pub fn wait(&mut self) -> anyhow::Result<Option<PathBuf>> {
        if !std::mem::take(&mut self.in_flight) {
            return Ok(None);
        }
        let written = self
            .results
            .recv()
            .map_err(|_| anyhow::anyhow!("the checkpoint writer thread has stopped"))?;
        Ok(Some(written.context("writing a checkpoint")?))
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves `from` to `to`, replacing an older `to`.
fn replace_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    let rename = |a: &Path, b: &Path| {
        std::fs::rename(a, b)
            .with_context(|| format!("renaming {} to {}", a.display(), b.display()))
    };
    if to.exists() {
        let old = to.with_extension("old");
        remove_any(&old)?;
        rename(to, &old)?;
        rename(from, to)?;
        remove_any(&old)?;
    } else {
        rename(from, to)?;
    }
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::scaler::LossScaler;
    use convnets_pipeline::loader::LoaderState;
    use tch::nn::{self, VarStore};

    fn state(step: u64) -> TrainState {
        TrainState {
            epoch: step,
            step,
            loader: LoaderState::default(),
            scaler: LossScaler::new(false),
            best_top1: None,
            best_step: None,
            world_size: 1,
        }
    }

    fn model() -> anyhow::Result<(VarStore, Sgd)> {
        let vs = VarStore::new(Device::Cpu);
        let _ = vs.root().var(
            "w",
            &[64, 64],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let _ = vs.root().var("b", &[64], nn::Init::Const(0.5));
        let sgd = Sgd::new(&vs, 0.9, 0.0, false)?;
        Ok((vs, sgd))
    }

    fn weights_at(dir: &Path) -> anyhow::Result<Tensor> {
        let (vs, _) = model()?;
        convnets_models::weights::load_safetensors(&vs, dir.join(checkpoint::MODEL_NAME))?;
        Ok(vs.variables()["w"].copy())
    }

    #[test]
    fn background_writes_leave_the_previous_checkpoint_whole_until_the_rename() -> anyhow::Result<()>
    {
        let tmp = tempfile::tempdir()?;
        let run = RunDir::new(tmp.path());
        std::fs::create_dir_all(run.checkpoints())?;
        let (vs, sgd) = model()?;
        let meta = CheckpointMeta::new(convnets_models::Arch::ResNet18, 2);
        let mut writer = CheckpointWriter::new();

        writer.submit(run.snapshot(&vs, &sgd, &meta, &state(1), 2)?)?;
        // The snapshot is taken at submit: later changes to the weights are not in it.
        let first = vs.variables()["w"].copy();
        let _ = vs.variables()["w"].detach().f_add_scalar_(1.0)?;
        let written = writer.wait()?.context("a write was in flight")?;
        assert!(weights_at(&written)?.equal(&first));

        // A process killed in the middle of the next write leaves its temporary folder
        // with a partial file: the latest checkpoint is still the whole previous one.
        let partial = run.checkpoints().join("step-00000002.tmp");
        std::fs::create_dir_all(&partial)?;
        let bytes = std::fs::read(written.join(checkpoint::MODEL_NAME))?;
        std::fs::write(
            partial.join(checkpoint::MODEL_NAME),
            &bytes[..bytes.len() / 2],
        )?;
        let (latest, st) = run.latest()?.context("a checkpoint")?;
        assert_eq!((latest.clone(), st.step), (written.clone(), 1));
        assert!(weights_at(&latest)?.equal(&first));

        // A write that fails is an error naming the path, returned by the next wait.
        std::fs::write(run.checkpoints().join("step-00000003.tmp"), b"in the way")?;
        writer.submit(run.snapshot(&vs, &sgd, &meta, &state(3), 2)?)?;
        let err = format!("{:#}", writer.wait().expect_err("the write fails"));
        assert!(err.contains("step-00000003.tmp"), "{err}");
        assert_eq!(run.latest()?.context("a checkpoint")?.1.step, 1);
        std::fs::remove_file(run.checkpoints().join("step-00000003.tmp"))?;

        // A writer dropped (end of training, Ctrl-C) finishes the write in flight first;
        // the one before it is retried cleanly from its leftovers.
        writer.submit(run.snapshot(&vs, &sgd, &meta, &state(2), 2)?)?;
        writer.wait()?;
        writer.submit(run.snapshot(&vs, &sgd, &meta, &state(4), 2)?)?;
        drop(writer);
        let (latest, st) = run.latest()?.context("a checkpoint")?;
        assert_eq!(st.step, 4);
        assert!(weights_at(&latest)?.equal(&vs.variables()["w"]));
        // keep_last 2: step 1 is gone, steps 2 and 4 stay; no temporary folder is left.
        let mut names: Vec<String> = std::fs::read_dir(run.checkpoints())?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<anyhow::Result<_>>()?;
        names.sort();
        assert_eq!(names, ["step-00000002", "step-00000004"]);
        Ok(())
    }
}
