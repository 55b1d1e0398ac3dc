//! The training step's optimizer against PyTorch's: from the same weights, with the same
//! gradients and learning rates, `Sgd` (PyTorch's fused SGD kernel over our flat buffers,
//! with the seed's parameter groups) ends where `torch.optim.SGD` with those groups does,
//! with Nesterov on and off. The reference runs in the workspace venv (`scripts/setup`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use convnets_tools::torch_ext::non_finite_check_and_unscale;
use convnets_tools::train::sgd::Sgd;
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

const LRS: [f64; 3] = [0.1, 0.05, 0.2];

fn python() -> Result<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    ensure!(
        python.exists(),
        "{} is missing: scripts/setup makes the venv these tests compare against",
        python.display()
    );
    Ok(python)
}

fn compare(nesterov: bool) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    tch::manual_seed(5);
    let vs = VarStore::new(Device::Cpu);
    // 10 classes: the classifier's 10-element bias is where unaligned offsets would start.
    let model = convnets_models::registry::build(
        "resnet18",
        &vs.root(),
        10,
        &convnets_models::ModelConfig::default(),
    )?;
    let (momentum, wd) = (0.875, 3.0517578125e-05);
    let mut sgd = Sgd::new(&vs, momentum, wd, nesterov)?;
    let trainable = || -> Vec<(String, Tensor)> {
        vs.variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    };
    Tensor::write_safetensors(
        &trainable()
            .iter()
            .map(|(n, t)| (n.clone(), t.detach().copy()))
            .collect::<Vec<_>>(),
        dir.join("initial.safetensors"),
    )?;
    // One backward gives every parameter its gradient (a view of the flat buffer); the
    // test then writes its own gradients there.
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    model.forward_t(&x, true).sum(Kind::Float).backward();
    let _ = sgd.flat_grads();
    let found_inf = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (k, lr) in LRS.iter().enumerate() {
        let mut grads = Vec::new();
        for (name, p) in trainable() {
            let g = Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * 0.1;
            p.grad().copy_(&g);
            grads.push((name, g));
        }
        Tensor::write_safetensors(&grads, dir.join(format!("grads-{k}.safetensors")))?;
        let flat = sgd.flat_grads().shallow_clone();
        non_finite_check_and_unscale(&[&flat], &found_inf, &Tensor::from(1.0f32))?;
        sgd.step(&Tensor::from(*lr as f32), &found_inf)?;
    }
    std::fs::write(
        dir.join("lrs.json"),
        serde_json::to_vec(&LRS.iter().map(|&l| l as f32 as f64).collect::<Vec<_>>())?,
    )?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sgd_reference.py");
    let out = Command::new(python()?)
        .arg(&script)
        .arg(dir)
        .arg(momentum.to_string())
        .arg(wd.to_string())
        .arg(if nesterov { "1" } else { "0" })
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("torch.safetensors"))?
            .into_iter()
            .collect();
    let mut worst = (0.0f64, String::new());
    for (name, ours) in trainable() {
        let t = theirs
            .get(&name)
            .with_context(|| format!("{name} missing from the reference"))?;
        let scale = t.abs().max().double_value(&[]).max(1e-3);
        let d = (&ours - t).abs().max().double_value(&[]) / scale;
        if d > worst.0 {
            worst = (d, name);
        }
    }
    ensure!(
        worst.0 < 1e-5,
        "nesterov {nesterov}: {} differs from torch.optim.SGD by {:.2e} (relative)",
        worst.1,
        worst.0
    );
    ensure!(
        theirs.len() == trainable().len(),
        "{} parameters vs {} in the reference",
        trainable().len(),
        theirs.len()
    );
    Ok(())
}

#[test]
fn three_steps_equal_torch_optim_sgd_with_the_seeds_groups() -> Result<()> {
    compare(false)
}

#[test]
fn three_nesterov_steps_equal_torch_optim_sgd() -> Result<()> {
    compare(true)
}
