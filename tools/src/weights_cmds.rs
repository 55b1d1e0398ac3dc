//! `convnets import-weights` and `convnets export-weights`: torchvision/timm safetensors
//! files in and out of our checkpoint folders. The names are the same on both sides; what
//! the commands add is a strict check (every tensor present, with the right shape) and the
//! architecture and class count that a checkpoint carries.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use convnets_formats::Dataset;
use convnets_models::{weights, Arch, ModelConfig};
use tch::nn::VarStore;
use tch::Device;

use crate::checkpoint::{self, CheckpointMeta};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A safetensors file of a torchvision or timm model's state_dict.
    pub weights: PathBuf,
    /// Architecture of the weights (resnet18 ... seresnext101_32x4d).
    #[arg(long)]
    pub arch: Arch,
    /// Checkpoint folder to create.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Take class names from this dataset's manifest (their count must match the weights).
    #[arg(long)]
    pub classes_from: Option<PathBuf>,
}

pub fn import(a: ImportArgs) -> anyhow::Result<()> {
    let file = weights::read_safetensors(&a.weights)?;
    let num_classes = checkpoint::num_classes_of(&file, &a.weights)?;
    drop(file);
    let vs = VarStore::new(Device::Cpu);
    a.arch
        .build(&vs.root(), num_classes, &ModelConfig::default())?;
    weights::load_safetensors(&vs, &a.weights).with_context(|| {
        format!(
            "{} is not a {} state_dict",
            a.weights.display(),
            a.arch.name()
        )
    })?;
    let mut meta = CheckpointMeta::new(a.arch, num_classes);
    meta.source = format!("imported from {}", a.weights.display());
    if let Some(ds) = &a.classes_from {
        let classes = Dataset::open(ds)?.manifest().classes.clone();
        if classes.len() as i64 != num_classes {
            bail!(
                "{} has {} classes but the weights have {num_classes}",
                ds.display(),
                classes.len()
            );
        }
        meta.classes = classes;
    }
    checkpoint::save(&a.output, &vs, &meta)?;
    println!(
        "{}: {} with {num_classes} classes, from {}",
        a.output.display(),
        a.arch.name(),
        a.weights.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint folder.
    pub checkpoint: PathBuf,
    /// safetensors file to write (loads with torchvision/timm `load_state_dict`).
    #[arg(long, short)]
    pub output: PathBuf,
}

pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    let loaded = checkpoint::load(&a.checkpoint, Device::Cpu, &ModelConfig::default())?;
    weights::save_safetensors(&loaded.vs, &a.output)?;
    println!(
        "{}: {} state_dict ({} classes)",
        a.output.display(),
        loaded.meta.arch,
        loaded.meta.num_classes
    );
    Ok(())
}
