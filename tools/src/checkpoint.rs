//! The model part of a checkpoint folder: `model.safetensors` (parameter and buffer names as
//! in torchvision/timm) and `checkpoint.json` (format, architecture, number of classes,
//! class names). Training adds optimizer and loader state beside these.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use convnets_formats::ClassInfo;
use convnets_models::{weights, Arch, ModelConfig};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Device;

pub const META_NAME: &str = "checkpoint.json";
pub const MODEL_NAME: &str = "model.safetensors";
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
        }
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(META_NAME);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let meta: Self = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a convnets checkpoint description", path.display()))?;
        if meta.format != FORMAT {
            bail!("{}: format is '{}', expected '{FORMAT}'", path.display(), meta.format);
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
