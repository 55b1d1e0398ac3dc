//! The model registry: `--arch` names to constructors.
//!
//! ```no_run
//! # fn main() -> Result<(), convnets_models::Error> {
//! use convnets_models::{registry, ModelConfig};
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! let model = registry::build("resnet50", &vs.root(), 1000, &ModelConfig::default())?;
//! # let _ = model;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::str::FromStr;

use tch::nn::Path;

use crate::error::{Error, Result};
use crate::resnet::{self, ModelConfig, ResNet, ResNetSpec};

/// Every architecture the registry builds.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// torchvision `resnet18`.
    ResNet18,
    /// torchvision `resnet34`.
    ResNet34,
    /// torchvision `resnet50` (v1.5).
    ResNet50,
    /// torchvision `resnet101` (v1.5).
    ResNet101,
    /// torchvision `resnet152` (v1.5).
    ResNet152,
    /// timm `resnext101_32x4d`.
    ResNeXt101_32x4d,
    /// timm `seresnext101_32x4d`.
    SeResNeXt101_32x4d,
}

/// The `--arch` names, in [`Arch::ALL`] order.
pub const ARCH_NAMES: &[&str] = &[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext101_32x4d",
    "seresnext101_32x4d",
];

impl Arch {
    /// Every architecture, in [`ARCH_NAMES`] order.
    pub const ALL: [Arch; 7] = [
        Arch::ResNet18,
        Arch::ResNet34,
        Arch::ResNet50,
        Arch::ResNet101,
        Arch::ResNet152,
        Arch::ResNeXt101_32x4d,
        Arch::SeResNeXt101_32x4d,
    ];

    /// The `--arch` name (also the torchvision / timm model name).
    pub fn name(self) -> &'static str {
        ARCH_NAMES[self as usize]
    }

    /// The network's shape.
    pub fn spec(self) -> ResNetSpec {
        match self {
            Arch::ResNet18 => resnet::RESNET18,
            Arch::ResNet34 => resnet::RESNET34,
            Arch::ResNet50 => resnet::RESNET50,
            Arch::ResNet101 => resnet::RESNET101,
            Arch::ResNet152 => resnet::RESNET152,
            Arch::ResNeXt101_32x4d => resnet::RESNEXT101_32X4D,
            Arch::SeResNeXt101_32x4d => resnet::SERESNEXT101_32X4D,
        }
    }

    /// The library whose parameter names (and reference implementation) this model follows.
    pub fn reference_library(self) -> &'static str {
        match self {
            Arch::ResNeXt101_32x4d | Arch::SeResNeXt101_32x4d => "timm",
            _ => "torchvision",
        }
    }

    /// Builds the model under `p` (`vs.root()` gives torchvision/timm names).
    pub fn build(self, p: &Path, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
        resnet::resnet(p, &self.spec(), num_classes, cfg)
    }
}

impl FromStr for Arch {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Arch::ALL
            .into_iter()
            .find(|arch| arch.name() == name)
            .ok_or_else(|| Error::UnknownArch {
                name: name.to_string(),
                known: ARCH_NAMES,
            })
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Builds the model named `arch` (an `--arch` value) under `p`.
pub fn build(arch: &str, p: &Path, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
    arch.parse::<Arch>()?.build(p, num_classes, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() -> Result<()> {
        assert_eq!(Arch::ALL.len(), ARCH_NAMES.len());
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>()?, arch);
            assert_eq!(arch.to_string(), arch.name());
        }
        Ok(())
    }

    #[test]
    fn unknown_arch_lists_the_known_ones() {
        let err = "resnet51"
            .parse::<Arch>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("`resnet51`"), "{err}");
        for name in ARCH_NAMES {
            assert!(err.contains(name), "{err} does not list {name}");
        }
    }
}
