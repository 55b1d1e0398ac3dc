//! Parameter counts and state_dict sizes equal torchvision's / timm's, for every architecture.
//!
//! The numbers come from `make_reference.py counts` (torch 2.11, torchvision 0.26, timm 1.0.31):
//! `sum(p.numel() for p in model.parameters())` and `len(model.state_dict())` at 1000 classes.

use anyhow::{ensure, Result};
use convnets_models::{num_parameters, registry, Arch, ModelConfig, ARCH_NAMES};
use tch::nn::VarStore;
use tch::Device;

/// (arch, parameters, state_dict entries incl. BN buffers)
const EXPECTED: [(&str, usize, usize); 7] = [
    ("resnet18", 11_689_512, 122),
    ("resnet34", 21_797_672, 218),
    ("resnet50", 25_557_032, 320),
    ("resnet101", 44_549_160, 626),
    ("resnet152", 60_192_808, 932),
    ("resnext101_32x4d", 44_177_704, 626),
    ("seresnext101_32x4d", 48_955_416, 758),
];

#[test]
fn parameter_counts_match_torchvision_and_timm() -> Result<()> {
    assert_eq!(EXPECTED.map(|(name, _, _)| name), ARCH_NAMES);
    let mut wrong = Vec::new();
    for (name, params, entries) in EXPECTED {
        let vs = VarStore::new(Device::Cpu);
        let _model = registry::build(name, &vs.root(), 1000, &ModelConfig::default())?;
        let (got_params, got_entries) = (num_parameters(&vs), vs.variables().len());
        if (got_params, got_entries) != (params, entries) {
            wrong.push(format!(
                "{name}: {got_params} parameters / {got_entries} tensors, expected {params} / {entries}"
            ));
        }
    }
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

#[test]
fn classifier_follows_num_classes() -> Result<()> {
    // torchvision.models.resnet50(num_classes=10): 25,557,032 - 990 * (2048 + 1).
    let vs = VarStore::new(Device::Cpu);
    let _model = Arch::ResNet50.build(&vs.root(), 10, &ModelConfig::default())?;
    assert_eq!(num_parameters(&vs), 23_528_522);
    assert_eq!(vs.variables()["fc.weight"].size(), [10, 2048]);
    Ok(())
}

#[test]
fn unknown_arch_is_an_error_naming_the_known_ones() {
    let vs = VarStore::new(Device::Cpu);
    let message = match registry::build("resnet200", &vs.root(), 1000, &ModelConfig::default()) {
        Ok(_) => String::from("built"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.starts_with("unknown architecture `resnet200`"),
        "{message}"
    );
    assert!(message.contains("resnet18, resnet34, resnet50, resnet101, resnet152, resnext101_32x4d, seresnext101_32x4d"), "{message}");
}
