//! Initial weights against torchvision's and timm's: for resnet50 (torchvision,
//! `zero_init_residual=True`) and seresnext101_32x4d (timm, whose default zeroes the last
//! BN of each block too) every parameter and buffer has the same name and element count,
//! and the mean and standard deviation of its freshly initialised values agree within
//! sampling error. Constants (BN gammas of 1 or 0, betas, running statistics) must be equal.
//!
//! Tolerance: for n values of standard deviation s, a sample mean has a standard error of
//! s / sqrt(n) and a sample standard deviation one of at most s / sqrt(2n) (normal values;
//! uniform ones scatter less), so the difference of two independent draws has standard
//! errors s * sqrt(2 / n) and s / sqrt(n). Six of those bound it: over the 1,842
//! comparisons (921 tensors) a false alarm is below one in 10^5, while a wrong fan (a
//! factor of 2 or more in the variance), a wrong uniform bound or a missed zero-init is off
//! by many standard errors on all but the smallest tensors.
//!
//! Needs the workspace venv (`scripts/setup`) with torch, torchvision and timm.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use convnets_models::{registry, ModelConfig};
use tch::nn::VarStore;
use tch::{Device, Kind};

/// Prints `name numel mean std` for every parameter and buffer of a fresh model.
const REFERENCE: &str = r#"
import sys
import torch, torchvision, timm
torch.set_num_threads(1)
torch.manual_seed(0)
arch = sys.argv[1]
if arch == "resnet50":
    model = torchvision.models.resnet50(weights=None, zero_init_residual=True)
else:
    model = timm.create_model(arch, pretrained=False)
for name, t in list(model.named_parameters()) + list(model.named_buffers()):
    if name.endswith("num_batches_tracked"):
        continue
    t = t.detach().double()
    print(name, t.numel(), t.mean().item(), t.std(unbiased=False).item())
"#;

/// numel, mean, standard deviation.
type Stats = (i64, f64, f64);

fn reference(arch: &str) -> Result<BTreeMap<String, Stats>> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = Command::new(&python)
        .args(["-c", REFERENCE, arch])
        .output()
        .with_context(|| format!("running {} (scripts/setup makes it)", python.display()))?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut stats = BTreeMap::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.len() == 4, "reference line {line:?}");
        stats.insert(
            f[0].to_string(),
            (f[1].parse()?, f[2].parse()?, f[3].parse()?),
        );
    }
    Ok(stats)
}

fn ours(arch: &str) -> Result<BTreeMap<String, Stats>> {
    // One thread: faster than several on shared cores for these small fills.
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    registry::build(arch, &vs.root(), 1000, &ModelConfig::default())?;
    let mut stats = BTreeMap::new();
    for (name, t) in vs.variables() {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let t = t.f_to_kind(Kind::Double)?;
        let mean = t.f_mean(Kind::Double)?.f_double_value(&[])?;
        let std = t.f_std(false)?.f_double_value(&[])?;
        stats.insert(name, (t.numel() as i64, mean, std));
    }
    Ok(stats)
}

fn compare(arch: &str) -> Result<()> {
    let (ours, theirs) = (ours(arch)?, reference(arch)?);
    let names = |m: &BTreeMap<String, Stats>| m.keys().cloned().collect::<Vec<_>>();
    ensure!(
        names(&ours) == names(&theirs),
        "{arch}: names differ; ours only: {:?}; reference only: {:?}",
        ours.keys()
            .filter(|k| !theirs.contains_key(*k))
            .collect::<Vec<_>>(),
        theirs
            .keys()
            .filter(|k| !ours.contains_key(*k))
            .collect::<Vec<_>>()
    );
    let mut bad = Vec::new();
    for (name, &(n, mean, std)) in &ours {
        let (tn, tmean, tstd) = theirs[name];
        let s = std.max(tstd);
        let nf = n as f64;
        let ok = n == tn
            && (mean - tmean).abs() <= 6.0 * s * (2.0 / nf).sqrt() + 1e-12
            && (std - tstd).abs() <= 6.0 * s / nf.sqrt() + 1e-12;
        if !ok {
            bad.push(format!(
                "{name}: ours n={n} mean={mean:.3e} std={std:.3e}, \
                 reference n={tn} mean={tmean:.3e} std={tstd:.3e}"
            ));
        }
    }
    ensure!(
        bad.is_empty(),
        "{arch}: {} of {} tensors differ:\n{}",
        bad.len(),
        ours.len(),
        bad.join("\n")
    );
    Ok(())
}

#[test]
fn resnet50_init_matches_torchvision() -> Result<()> {
    compare("resnet50")
}

#[test]
fn seresnext101_32x4d_init_matches_timm() -> Result<()> {
    compare("seresnext101_32x4d")
}
