//! The model part of a checkpoint folder: `model.safetensors` (parameter and buffer names as
//! in torchvision/timm) and `checkpoint.json` (format, architecture, number of classes,
//! class names). Training adds optimizer and loader state beside these.
//!
//! Commands that take a checkpoint (`eval`, `predict`, `train --init-from`) go through
//! [`resolve`], so a run folder works too: its `best` checkpoint, else its latest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use convnets_formats::ClassInfo;
use convnets_models::{weights, Arch, ModelConfig};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Tensor};

pub const META_NAME: &str = "checkpoint.json";
pub const MODEL_NAME: &str = "model.safetensors";
/// The moving average of the weights, when a run keeps one (names as in the model).
pub const EMA_NAME: &str = "ema.safetensors";
/// In a run's `checkpoints/`: a relative symlink to the best `step-N` (a copy of it in runs
/// made before the pointer).
pub const BEST_NAME: &str = "best";
const FORMAT: &str = "convnets-checkpoint";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: String,
    pub version: u32,
    pub arch: String,
    pub num_classes: i64,
    /// Class names in label order, when known, so a checkpoint alone can predict.
    #[serde(default)]
    pub classes: Vec<ClassInfo>,
    /// Where the weights came from (informational).
    #[serde(default)]
    pub source: String,
    /// Side of the training crops: what `eval` and `predict` use unless told otherwise.
    /// Unknown (`None`) for imported weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<u32>,
}

impl CheckpointMeta {
    pub fn new(arch: Arch, num_classes: i64) -> Self {
        Self {
            format: FORMAT.into(),
            version: VERSION,
            arch: arch.name().into(),
            num_classes,
            classes: Vec::new(),
            source: String::new(),
            image_size: None,
        }
    }

    /// The input size for evaluating these weights: `flag` when given, else the size they
    /// were trained at, else 224 (ImageNet's), saying so on stderr.
    pub fn eval_image_size(&self, flag: Option<u32>) -> u32 {
        match (flag, self.image_size) {
            (Some(size), _) => size,
            (None, Some(size)) => size,
            (None, None) => {
                eprintln!("the checkpoint does not say what size it was trained at (imported weights): using 224; --image-size sets it");
                224
            }
        }
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(META_NAME);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let meta: Self = serde_json::from_slice(&text).with_context(|| {
            format!("{}: not a convnets checkpoint description", path.display())
        })?;
        if meta.format != FORMAT {
            bail!(
                "{}: format is '{}', expected '{FORMAT}'",
                path.display(),
                meta.format
            );
        }
        if meta.version != VERSION {
            bail!(
                "{}: checkpoint version {} (this build reads version {VERSION})",
                path.display(),
                meta.version
            );
        }
        Ok(meta)
    }

    /// The model's outputs must mean `dataset`'s labels: the same classes in the same order,
    /// or, for weights that carry no class names, at least as many outputs as classes.
    /// `what` names the dataset in the error.
    pub fn check_classes(&self, dataset: &[ClassInfo], what: &str) -> anyhow::Result<()> {
        let (mine, theirs) = (self.classes.len(), dataset.len());
        if theirs == 0 {
            return Ok(());
        }
        if mine == 0 {
            if theirs as i64 > self.num_classes {
                bail!(
                    "the checkpoint's model has {} outputs but {what} has {theirs} classes",
                    self.num_classes
                );
            }
            return Ok(());
        }
        if mine != theirs {
            bail!(
                "the checkpoint was trained on {mine} classes ({}, ...) but {what} has {theirs} ({}, ...): \
                 its labels would not mean the model's classes",
                self.classes[0].wnid,
                dataset[0].wnid
            );
        }
        if let Some(i) = (0..mine).find(|&i| self.classes[i].wnid != dataset[i].wnid) {
            bail!(
                "class {i} is {} in the checkpoint but {} in {what}: the same {mine} classes are needed in the same order",
                self.classes[i].wnid,
                dataset[i].wnid
            );
        }
        Ok(())
    }

    pub fn arch(&self) -> anyhow::Result<Arch> {
        Ok(self.arch.parse()?)
    }
}

/// A model built for a checkpoint, with its weights loaded (strictly).
pub struct LoadedModel {
    pub meta: CheckpointMeta,
    pub vs: VarStore,
    pub model: convnets_models::resnet::ResNet,
}

/// The checkpoint folder `path` names: itself when it holds `checkpoint.json`; for a run
/// folder (one with `checkpoints/`), its `best` checkpoint, else its latest `step-N`.
pub fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    if !path.exists() {
        bail!("{}: no such checkpoint or run folder", path.display());
    }
    if path.join(META_NAME).is_file() {
        return Ok(path.to_path_buf());
    }
    let root = path.join("checkpoints");
    if !root.is_dir() {
        bail!(
            "{} is neither a checkpoint folder (no {META_NAME}) nor a run folder (no checkpoints/)",
            path.display()
        );
    }
    let best = root.join(BEST_NAME);
    if best.join(META_NAME).is_file() {
        // The step the pointer names, so messages say which checkpoint was used.
        return Ok(match std::fs::read_link(&best) {
            Ok(target) => root.join(target),
            Err(_) => best,
        });
    }
    match latest_step(&root)? {
        Some(dir) => Ok(dir),
        None => bail!(
            "{}: the run holds no finished checkpoint yet",
            path.display()
        ),
    }
}

/// The `step-N` folders under a run's `checkpoints/` (the one place that knows how they are
/// named), oldest first; a `step-N.tmp` being written is not one. Empty when there is no
/// such folder.
pub fn step_dirs(root: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
    };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let step = e
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse::<u64>()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort();
    Ok(steps)
}

/// The folder name of the checkpoint at `step`.
pub fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step `root/best` points at, if it is a pointer to a `step-N` (not for a missing
/// `best` or a copy made by older runs).
pub fn best_step(root: &Path) -> anyhow::Result<Option<u64>> {
    let best = root.join(BEST_NAME);
    match std::fs::read_link(&best) {
        Ok(target) => Ok(target
            .to_str()
            .and_then(|t| t.strip_prefix("step-"))
            .and_then(|n| n.parse().ok())),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.kind() == std::io::ErrorKind::InvalidInput =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", best.display())),
    }
}

/// The newest finished `step-N` folder (one holding `checkpoint.json`), if any.
pub fn latest_step(root: &Path) -> anyhow::Result<Option<PathBuf>> {
    Ok(step_dirs(root)?
        .into_iter()
        .rev()
        .map(|(_, dir)| dir)
        .find(|dir| dir.join(META_NAME).is_file()))
}

/// The class count of a ResNet-family state_dict: the rows of `fc.weight`.
pub fn num_classes_of(file: &HashMap<String, Tensor>, path: &Path) -> anyhow::Result<i64> {
    let fc = file.get("fc.weight").with_context(|| {
        format!(
            "{}: no fc.weight, so not a ResNet-family state_dict",
            path.display()
        )
    })?;
    match fc.size().as_slice() {
        [n, _] => Ok(*n),
        shape => bail!(
            "{}: fc.weight has shape {shape:?}, expected [classes, features]",
            path.display()
        ),
    }
}

/// Loads a checkpoint folder (after [`resolve`]) or a bare safetensors state_dict, which
/// needs `arch` and has no class names. A given `arch` must match the checkpoint's.
pub fn load_any(
    path: &Path,
    arch: Option<Arch>,
    device: Device,
    cfg: &ModelConfig,
) -> anyhow::Result<LoadedModel> {
    if !path.is_file() {
        let loaded = load(&resolve(path)?, device, cfg)?;
        if let Some(arch) = arch {
            if arch.name() != loaded.meta.arch {
                bail!(
                    "{} holds {} weights, not {}",
                    path.display(),
                    loaded.meta.arch,
                    arch.name()
                );
            }
        }
        return Ok(loaded);
    }
    let arch = arch.with_context(|| {
        format!(
            "{} is a weights file: say which model with --arch",
            path.display()
        )
    })?;
    let file = weights::read_safetensors(path)?;
    let num_classes = num_classes_of(&file, path)?;
    let mut vs = VarStore::new(Device::Cpu);
    let model = arch.build(&vs.root(), num_classes, cfg)?;
    weights::load_tensors_except(&vs, path, &file, &[])
        .with_context(|| format!("{} is not a {} state_dict", path.display(), arch.name()))?;
    vs.set_device(device);
    let mut meta = CheckpointMeta::new(arch, num_classes);
    meta.source = path.display().to_string();
    Ok(LoadedModel { meta, vs, model })
}

/// Replaces the parameters of `vs` with the moving average kept in the checkpoint folder
/// `dir` (`ema.safetensors`). Parameters absent from it (a frozen backbone, whose average is
/// itself) keep their weights.
pub fn apply_ema(vs: &VarStore, dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(EMA_NAME);
    let ema = Tensor::read_safetensors(&path)
        .with_context(|| format!("--ema: reading {}", path.display()))?;
    let vars = vs.variables();
    let _guard = tch::no_grad_guard();
    for (name, t) in ema {
        let mut var = vars
            .get(&name)
            .filter(|v| v.requires_grad())
            .with_context(|| format!("{}: {name} is not a parameter of the model", path.display()))?
            .shallow_clone();
        if var.size() != t.size() {
            bail!(
                "{}: {name} has shape {:?}, the model {:?}",
                path.display(),
                t.size(),
                var.size()
            );
        }
        var.copy_(&t);
    }
    Ok(())
}

pub fn load(dir: &Path, device: Device, cfg: &ModelConfig) -> anyhow::Result<LoadedModel> {
    let meta = CheckpointMeta::load(dir)?;
    let mut vs = VarStore::new(Device::Cpu);
    let model = meta.arch()?.build(&vs.root(), meta.num_classes, cfg)?;
    let path = dir.join(MODEL_NAME);
    weights::load_safetensors(&vs, &path).with_context(|| format!("loading {}", path.display()))?;
    vs.set_device(device);
    Ok(LoadedModel { meta, vs, model })
}

/// Writes `model.safetensors` then `checkpoint.json` into `dir` (each atomically; the
/// description last, so a folder with one always has its weights).
pub fn save(dir: &Path, vs: &VarStore, meta: &CheckpointMeta) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    weights::save_safetensors(vs, dir.join(MODEL_NAME))?;
    let mut text = serde_json::to_vec_pretty(meta)?;
    text.push(b'\n');
    convnets_formats::atomic::write_atomic(&dir.join(META_NAME), &text)?;
    Ok(dir.to_path_buf())
}
