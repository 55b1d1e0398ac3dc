//! The loss a training step computes (`TrainStep::run`, read back by `readout`) equals
//! PyTorch's `F.cross_entropy(logits, labels, label_smoothing=s)` on the same logits and
//! labels, for several smoothings and for a mixup step (the same mix of the two labels'
//! losses). The step runs at LR 0 so that the model's training-mode logits, taken before
//! it, are the ones it saw. The reference runs in the workspace venv (`scripts/setup`).

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use convnets_tools::train::scaler::LossScaler;
use convnets_tools::train::sgd::Sgd;
use convnets_tools::train::step::{StepInput, StepOptions, TrainStep};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

const SMOOTHINGS: [f64; 3] = [0.0, 0.1, 0.3];
const MIXUP_WEIGHT: f64 = 0.7;

/// argv: logits/labels file, smoothings (JSON), mixup weight. Prints the plain losses, then
/// the mixup loss at the last smoothing.
const REFERENCE: &str = r#"
import json, sys
import torch.nn.functional as F
from safetensors.torch import load_file
t = load_file(sys.argv[1])
smoothings, lam = json.loads(sys.argv[2]), float(sys.argv[3])
ce = lambda y, s: F.cross_entropy(t["logits"], y, label_smoothing=s).item()
losses = [ce(t["labels"], s) for s in smoothings]
s = smoothings[-1]
losses.append(lam * ce(t["labels"], s) + (1 - lam) * ce(t["other"], s))
print(json.dumps(losses))
"#;

/// The loss of one step at LR 0 on `images`, as the step reports it.
fn step_loss(
    vs: &VarStore,
    model: &convnets_models::resnet::ResNet,
    smoothing: f64,
    input: StepInput,
) -> Result<f64> {
    let sgd = Sgd::new(vs, 0.875, 3.0517578125e-05, false)?;
    let opts = StepOptions {
        amp: false,
        label_smoothing: smoothing,
        train_bn: true,
        cuda_graphs: false,
        allreduce_kind: Kind::Float,
    };
    let mut step = TrainStep::new(sgd, &LossScaler::new(false), opts, Device::Cpu)?;
    step.run(model, input, 0.0, None)?;
    Ok(step.readout()?.loss)
}

#[test]
fn step_loss_equals_torch_label_smoothed_cross_entropy() -> Result<()> {
    // One thread: a tiny model on shared cores is slower with more.
    tch::set_num_threads(1);
    tch::manual_seed(11);
    let vs = VarStore::new(Device::Cpu);
    let classes = 10;
    let model = convnets_models::registry::build(
        "resnet18",
        &vs.root(),
        classes,
        &convnets_models::ModelConfig::default(),
    )?;
    // A wider classifier than the initial one, so that the logits are far from uniform and
    // the smoothing term weighs.
    tch::no_grad(|| {
        let fc = &vs.variables()["fc.weight"];
        fc.shallow_clone()
            .copy_(&(Tensor::randn(fc.size(), (Kind::Float, Device::Cpu)) * 0.1));
    });
    let images = Tensor::randn([16, 3, 32, 32], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(classes, [16], (Kind::Int64, Device::Cpu));
    let other = Tensor::randint(classes, [16], (Kind::Int64, Device::Cpu));
    let logits = tch::no_grad(|| model.forward_t(&images, true));

    let mut ours = Vec::new();
    for s in SMOOTHINGS {
        ours.push(step_loss(&vs, &model, s, StepInput::new(&images, &labels))?);
    }
    let mixed = StepInput {
        images: &images,
        labels: &labels,
        mixed_with: Some((MIXUP_WEIGHT, &other)),
    };
    ours.push(step_loss(&vs, &model, SMOOTHINGS[2], mixed)?);

    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("logits.safetensors");
    Tensor::write_safetensors(
        &[("logits", &logits), ("labels", &labels), ("other", &other)],
        &file,
    )?;
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = Command::new(&python)
        .args(["-c", REFERENCE])
        .arg(&file)
        .arg(serde_json::to_string(&SMOOTHINGS)?)
        .arg(MIXUP_WEIGHT.to_string())
        .output()
        .with_context(|| format!("running {} (scripts/setup makes it)", python.display()))?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<f64> = serde_json::from_slice(&out.stdout)?;
    ensure!(theirs.len() == ours.len(), "{theirs:?} vs {ours:?}");
    ensure!(
        (theirs[1] - theirs[0]).abs() > 0.05,
        "smoothing should weigh on these logits: {theirs:?}"
    );
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        // f32 sums over 16 x 10 logits.
        ensure!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "case {i}: ours {a}, F.cross_entropy {b} (all ours {ours:?}, torch {theirs:?})"
        );
    }
    Ok(())
}
