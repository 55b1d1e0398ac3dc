//! `RandomResizedCrop::plan` draws its windows from the distribution torchvision's
//! `RandomResizedCrop.get_params` draws from: two-sample Kolmogorov-Smirnov tests (scipy's
//! `ks_2samp`, in the workspace venv) on the area fraction, the log aspect ratio and the
//! left/top offsets as fractions of the room left, over image shapes that exercise the
//! common case, the ratio clamp's fallback (a 1:4 image) and integer rounding (40 x 40).
//!
//! Seeds are fixed, so the test is deterministic; ALPHA = 1e-4 over 16 tests would reject a
//! correct sampler for fewer than 2 in 1,000 choices of seeds. With 20,000 windows a side the
//! test still sees a CDF gap of about 0.022, e.g. a scale range starting at 0.1, not 0.08.

use std::path::Path;
use std::process::Command;

use convnets_pipeline::plan::RandomResizedCrop;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SAMPLES: u64 = 20_000;
const ALPHA: f64 = 1e-4;
/// (width, height)
const SHAPES: [(u32, u32); 4] = [(500, 375), (224, 224), (64, 256), (40, 40)];

/// argv: the windows' JSON file, the sample count. Prints {"WxH": {stat: p-value}}.
const REFERENCE: &str = r#"
import json, sys
import numpy as np, torch
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop
ours, n = json.load(open(sys.argv[1])), int(sys.argv[2])
torch.set_num_threads(1)
torch.manual_seed(0)
def stats(windows, w0, h0):
    x, y, w, h = (np.array(c, dtype=float) for c in zip(*windows))
    return {"area": w * h / (w0 * h0), "log_ratio": np.log(w / h),
            "x": (x / (w0 - w))[w < w0], "y": (y / (h0 - h))[h < h0]}
result = {}
for key, windows in ours.items():
    w0, h0 = map(int, key.split("x"))
    image = torch.empty(1, h0, w0)
    theirs = []
    for _ in range(n):
        i, j, h, w = RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        theirs.append((j, i, w, h))
    a, b = stats(windows, w0, h0), stats(theirs, w0, h0)
    result[key] = {k: float(ks_2samp(a[k], b[k]).pvalue) for k in a}
print(json.dumps(result))
"#;

#[test]
fn windows_follow_torchvision_get_params() -> Result<()> {
    let rrc = RandomResizedCrop::default();
    let mut ours = serde_json::Map::new();
    for (w, h) in SHAPES {
        let windows: Vec<[f64; 4]> = (0..SAMPLES)
            .map(|seed| {
                let c = rrc.plan(w, h, seed);
                [c.x, c.y, c.width, c.height]
            })
            .collect();
        ours.insert(format!("{w}x{h}"), serde_json::to_value(windows)?);
    }
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("windows.json");
    std::fs::write(&file, serde_json::to_vec(&ours)?)?;
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = Command::new(&python)
        .args(["-c", REFERENCE])
        .arg(&file)
        .arg(SAMPLES.to_string())
        .output()
        .map_err(|e| format!("running {} (scripts/setup makes it): {e}", python.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into());
    }
    let pvalues: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let mut failed = Vec::new();
    for (shape, tests) in &pvalues {
        for (stat, p) in tests.as_object().ok_or("p-values")? {
            let p = p.as_f64().ok_or("p-value")?;
            if p < ALPHA {
                failed.push(format!("{shape} {stat}: p = {p:.2e}"));
            }
        }
    }
    if pvalues.len() != SHAPES.len() || !failed.is_empty() {
        return Err(format!(
            "distributions differ from torchvision's: {failed:?} (all: {pvalues:?})"
        )
        .into());
    }
    Ok(())
}
