//! Starting from trained weights: `--init-from` loads a checkpoint (or run folder, or a
//! torchvision/timm safetensors file) into a new run's model, leaving out a classifier of
//! another class count; `--freeze-backbone` trains the classifier only.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use convnets_models::{weights, Arch};
use tch::nn::VarStore;

use super::sgd::HEAD_PREFIX;
use crate::checkpoint::{self, CheckpointMeta};

const HEAD: [&str; 2] = ["fc.weight", "fc.bias"];

/// The weights file `--init-from` names: a safetensors file as is, else the
/// `model.safetensors` of the checkpoint a checkpoint or run folder resolves to, whose
/// architecture must be `arch`.
pub fn weights_file(source: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    if source.is_file() {
        return Ok(source.to_path_buf());
    }
    let dir = checkpoint::resolve(source).context("--init-from")?;
    let meta = CheckpointMeta::load(&dir)?;
    if meta.arch != arch.name() {
        bail!(
            "--init-from {} holds {} weights but --arch is {}",
            source.display(),
            meta.arch,
            arch.name()
        );
    }
    Ok(dir.join(checkpoint::MODEL_NAME))
}

/// Loads every weight of `source` into `vs`, strictly, except a classifier whose class
/// count differs from the model's: that keeps its fresh initialisation (and shape).
pub fn init_from(vs: &VarStore, source: &Path, arch: Arch) -> anyhow::Result<()> {
    let path = weights_file(source, arch)?;
    let file = weights::read_safetensors(&path)?;
    let model = vs.variables();
    let shape = |t: Option<&tch::Tensor>| t.map(|t| t.size());
    let (ours, theirs) = (shape(model.get(HEAD[0])), shape(file.get(HEAD[0])));
    // Only the class count may differ: [M, F] here, [N, F] there, with a bias of [N].
    let other_classes = match (&ours, &theirs) {
        (Some(o), Some(t)) if o.len() == 2 && t.len() == 2 && o[1] == t[1] && o[0] != t[0] => {
            shape(file.get(HEAD[1])) == Some(vec![t[0]])
        }
        _ => false,
    };
    let except: &[&str] = if other_classes { &HEAD } else { &[] };
    let summary = weights::load_tensors_except(vs, &path, &file, except)
        .with_context(|| format!("--init-from {}", source.display()))?;
    if let (true, Some(o), Some(t)) = (other_classes, ours, theirs) {
        eprintln!(
            "--init-from: {} has {} classes, the dataset {}: fc.weight and fc.bias are not loaded but initialised afresh as [{}, {}] and [{}]",
            path.display(), t[0], o[0], o[0], o[1], o[0]
        );
    }
    eprintln!(
        "initialised {} tensors from {}",
        summary.loaded,
        path.display()
    );
    Ok(())
}

/// Stops gradients for every parameter but the classifier's, so the optimizer takes only
/// those (it takes what requires grad) and backward stops at the classifier.
pub fn freeze_backbone(vs: &VarStore) {
    for (name, t) in vs.variables() {
        if !name.starts_with(HEAD_PREFIX) && t.requires_grad() {
            let _ = t.set_requires_grad(false);
        }
    }
}
