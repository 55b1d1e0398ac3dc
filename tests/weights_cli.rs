//! `convnets import-weights` / `export-weights` against real torchvision state_dicts saved
//! by Python (the set-up's .venv): import, export, and the exported file loads strictly
//! into torchvision with every tensor equal; it is even the same file, byte for byte.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use common::*;

fn python() -> Result<PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if !py.exists() {
        bail!("{} is missing: run scripts/setup", py.display());
    }
    Ok(py)
}

fn py(code: &str, args: &[&Path]) -> Result<String> {
    let out = Command::new(python()?)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .context("running python")?;
    if !out.status.success() {
        bail!("python failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const SAVE: &str = r#"
import sys, torch, torchvision
from safetensors.torch import save_file
torch.manual_seed(0)
m = getattr(torchvision.models, sys.argv[2])(num_classes=10)
with torch.no_grad():
    for b in m.modules():
        if isinstance(b, torch.nn.BatchNorm2d):
            b.running_mean.uniform_(-1, 1); b.running_var.uniform_(0.5, 2); b.weight.uniform_(0.5, 1.5)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])
"#;

const CHECK: &str = r#"
import sys, torch, torchvision
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
m = torchvision.models.resnet18(num_classes=10)
m.load_state_dict(b, strict=True)
assert a.keys() == b.keys(), set(a) ^ set(b)
bad = [k for k in a if not torch.equal(a[k], b[k])]
assert not bad, bad
print(len(a))
"#;

#[test]
fn torchvision_weights_round_trip_through_a_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let original = tmp.path().join("resnet18.safetensors");
    let arch = Path::new("resnet18");
    py(SAVE, &[&original, arch])?;
    let ckpt = tmp.path().join("ckpt");
    convnets(&[
        "import-weights",
        original.to_str().unwrap(),
        "--arch",
        "resnet18",
        "-o",
        ckpt.to_str().unwrap(),
    ])?;
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("checkpoint.json"))?)?;
    assert_eq!(meta["arch"], "resnet18");
    assert_eq!(meta["num_classes"], 10);

    let exported = tmp.path().join("exported.safetensors");
    convnets(&[
        "export-weights",
        ckpt.to_str().unwrap(),
        "-o",
        exported.to_str().unwrap(),
    ])?;
    let n: usize = py(CHECK, &[&original, &exported])?.trim().parse()?;
    assert_eq!(n, 122, "resnet18 state_dict entries");
    // Same names, order, dtypes and raw bytes as safetensors.torch wrote them.
    assert!(
        std::fs::read(&original)? == std::fs::read(&exported)?,
        "exported file differs from the imported one"
    );
    Ok(())
}

#[test]
fn weights_of_another_architecture_are_refused_by_name() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let original = tmp.path().join("resnet34.safetensors");
    py(SAVE, &[&original, Path::new("resnet34")])?;
    let ckpt = tmp.path().join("ckpt");
    let err = convnets(&[
        "import-weights",
        original.to_str().unwrap(),
        "--arch",
        "resnet18",
        "-o",
        ckpt.to_str().unwrap(),
    ])
    .unwrap_err();
    let msg = message(&err);
    assert!(
        msg.contains("resnet34.safetensors") && msg.contains("layer1.2"),
        "{msg}"
    );
    assert!(!ckpt.join("checkpoint.json").exists());

    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not safetensors at all")?;
    let err = convnets(&[
        "import-weights",
        junk.to_str().unwrap(),
        "--arch",
        "resnet18",
        "-o",
        ckpt.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(
        message(&err).contains("junk.safetensors"),
        "{}",
        message(&err)
    );
    let err = convnets(&[
        "import-weights",
        junk.to_str().unwrap(),
        "--arch",
        "resnet7",
        "-o",
        ckpt.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(
        message(&err).contains("resnet50"),
        "known archs are listed: {}",
        message(&err)
    );
    Ok(())
}
