//! The learning rate `train` uses at every step equals PyTorch's `LambdaLR` written
//! independently for the same recipe (linear warm-up from 0 over the warm-up epochs, then
//! cosine to 0 at the last epoch, stepped once per batch), for the LR of a whole logged run.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

const REFERENCE: &str = r#"
import json, math, sys
import torch
base, warmup_epochs, epochs, steps_per_epoch, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
warm, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
def factor(step):
    if step < warm:
        return step / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))
p = torch.nn.Parameter(torch.zeros(1))
opt = torch.optim.SGD([p], lr=base, momentum=0.875)
sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
lrs = []
for _ in range(n):
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
print(json.dumps(lrs))
"#;

#[test]
fn every_steps_lr_equals_torch_lambdalr() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let bin = env!("CARGO_BIN_EXE_convnets");
    // Synthetic data: 100 steps per epoch; batch 4 -> base LR 0.256 * 4 / 256.
    let out = Command::new(bin)
        .args([
            "train",
            "--loader",
            "synthetic",
            "--device",
            "cpu",
            "--arch",
            "resnet18",
            "--image-size",
            "16",
            "--batch-size",
            "4",
            "--epochs",
            "3",
            "--warmup-epochs",
            "1.5",
            "--eval-every",
            "0",
            "--log-every",
            "1",
            "--threads",
            "1",
            "-o",
        ])
        .arg(&run)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Vec<f64> = std::fs::read_to_string(run.join("log.jsonl"))?
        .lines()
        .map(serde_json::from_str::<serde_json::Value>)
        .filter_map(|v| v.ok())
        .filter(|v| v["type"] == "train")
        .map(|v| v["lr"].as_f64().context("lr"))
        .collect::<Result<_>>()?;
    ensure!(ours.len() == 300, "{} logged steps", ours.len());
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let reference = Command::new(&python)
        .args([
            "-c",
            REFERENCE,
            &(0.256 * 4.0 / 256.0).to_string(),
            "1.5",
            "3",
            "100",
            "300",
        ])
        .output()
        .with_context(|| format!("running {} (scripts/setup makes it)", python.display()))?;
    ensure!(
        reference.status.success(),
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let theirs: Vec<f64> = serde_json::from_slice(&reference.stdout)?;
    for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        ensure!(
            (a - b).abs() <= 1e-12 + 1e-9 * b.abs(),
            "step {step}: ours {a}, LambdaLR {b}"
        );
    }
    Ok(())
}
