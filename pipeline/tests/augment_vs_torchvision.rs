//! The CPU augment step against torchvision on PIL images, the reference every ImageNet
//! recipe was tuned with. `reference_augment.py` (next to this file, run with the
//! workspace's `.venv`) writes generated images and torchvision's outputs for
//! RandomResizedCrop windows (`F.resized_crop` + `hflip`) and for the eval transform
//! (`Resize(256)` + `CenterCrop(224)`); we run [`Augmenter`] on the same windows.
//!
//! Bounds, from measurement (printed by the test):
//! * RRC windows are integer, and our resampling is Pillow's: the `u8` output is
//!   identical (0 levels), the normalised `f32` output differs only by float rounding
//!   (one multiply-add instead of divide, subtract, divide), the `f16` one by f16 rounding.
//! * Eval: torchvision resizes the whole image to 256 on the short side (rounding to
//!   `u8`) and then crops; we resample once from the equivalent fractional window of the
//!   source. Same filter, one rounding fewer, so the error is small but not zero.

use std::path::{Path, PathBuf};
use std::process::Command;

use convnets_pipeline::cpu::augment::{Augmenter, Layout, Normalize, OutputDtype, OutputSpec};
use convnets_pipeline::plan::{CenterCrop, CropWindow};
use half::f16;
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Error statistics of one path (rrc or eval) over all its cases.
#[derive(Default)]
struct Errors {
    values: usize,
    u8_max: u32,
    u8_sum: u64,
    u8_differing: usize,
    f32_max: f32,
    f32_sum: f64,
    f16_max: f32,
    f16_sum: f64,
}

impl Errors {
    fn u8_mean(&self) -> f64 {
        self.u8_sum as f64 / self.values as f64
    }
    fn f32_mean(&self) -> f64 {
        self.f32_sum / self.values as f64
    }
    fn f16_mean(&self) -> f64 {
        self.f16_sum / self.values as f64
    }
}

fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: this test needs the workspace's Python environment with torch, \
         torchvision, pillow and numpy (create it with scripts/setup)",
        venv.display()
    );
    venv
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value, String> {
    v.get(key).ok_or_else(|| format!("manifest entry lacks `{key}`: {v}"))
}

fn num(v: &Value, key: &str) -> Result<f64, String> {
    field(v, key)?.as_f64().ok_or_else(|| format!("`{key}` is not a number in {v}"))
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    field(v, key)?.as_str().ok_or_else(|| format!("`{key}` is not a string in {v}"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_ne_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn augment_matches_torchvision() -> TestResult {
    let dir = tempfile::tempdir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_augment.py");
    let run = Command::new(python()).arg(&script).arg(dir.path()).output()?;
    assert!(
        run.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );

    let manifest: Value = serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json"))?)?;
    let normalize = Normalize::default();
    let as_f32 = |key| -> Result<Vec<f32>, String> {
        let list = field(&manifest, key)?.as_array().ok_or("not a list")?;
        Ok(list.iter().filter_map(Value::as_f64).map(|v| v as f32).collect())
    };
    assert_eq!(as_f32("mean")?, normalize.mean, "script and Normalize::default() disagree");
    assert_eq!(as_f32("std")?, normalize.std, "script and Normalize::default() disagree");

    let images = field(&manifest, "images")?.as_array().ok_or("images is not a list")?;
    let mut sources = Vec::new();
    for img in images {
        let (w, h) = (num(img, "width")? as u32, num(img, "height")? as u32);
        let rgb = std::fs::read(dir.path().join(text(img, "rgb")?))?;
        assert_eq!(rgb.len(), (w * h * 3) as usize);
        sources.push((w, h, rgb));
    }

    let mut augmenter = Augmenter::new();
    let (mut rrc, mut eval) = (Errors::default(), Errors::default());
    let cases = field(&manifest, "cases")?.as_array().ok_or("cases is not a list")?;
    for case in cases {
        let (w, h, src) = &sources[num(case, "image")? as usize];
        let (out_w, out_h) = (num(case, "out_width")? as u32, num(case, "out_height")? as u32);
        let (crop, errors) = match text(case, "path")? {
            "rrc" => {
                let crop = CropWindow {
                    x: num(case, "left")?,
                    y: num(case, "top")?,
                    width: num(case, "width")?,
                    height: num(case, "height")?,
                    flip: field(case, "flip")?.as_bool().ok_or("flip is not a bool")?,
                };
                (crop, &mut rrc)
            }
            "eval" => {
                let plan = CenterCrop {
                    resize: num(case, "resize")? as u32,
                    crop: num(case, "crop")? as u32,
                };
                (plan.plan(*w, *h), &mut eval)
            }
            other => return Err(format!("unknown path {other}").into()),
        };
        let want_u8 = std::fs::read(dir.path().join(text(case, "u8")?))?;
        let want_f32 = f32s(&std::fs::read(dir.path().join(text(case, "f32")?))?);

        let mut sample = |dtype, layout, normalize| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            let spec = OutputSpec { width: out_w, height: out_h, dtype, layout, normalize };
            let mut out = vec![0u8; spec.sample_bytes()];
            augmenter.crop_resize_into(src, *w, *h, &crop, &spec, &mut out)?;
            Ok(out)
        };
        let got_u8 = sample(OutputDtype::U8, Layout::Nhwc, None)?;
        let got_f32 = f32s(&sample(OutputDtype::F32, Layout::Nchw, Some(normalize))?);
        let got_f16: Vec<f32> = sample(OutputDtype::F16, Layout::Nchw, Some(normalize))?
            .chunks_exact(2)
            .map(|b| f16::from_ne_bytes([b[0], b[1]]).to_f32())
            .collect();
        assert_eq!(got_u8.len(), want_u8.len(), "{}", text(case, "name")?);
        assert_eq!(got_f32.len(), want_f32.len(), "{}", text(case, "name")?);

        let mut case_u8_max = 0;
        for (&a, &b) in got_u8.iter().zip(&want_u8) {
            let d = u32::from(a.abs_diff(b));
            case_u8_max = case_u8_max.max(d);
            errors.u8_sum += u64::from(d);
            errors.u8_differing += usize::from(d != 0);
        }
        errors.u8_max = errors.u8_max.max(case_u8_max);
        for ((&a, &h), &b) in got_f32.iter().zip(&got_f16).zip(&want_f32) {
            errors.f32_max = errors.f32_max.max((a - b).abs());
            errors.f32_sum += f64::from((a - b).abs());
            errors.f16_max = errors.f16_max.max((h - b).abs());
            errors.f16_sum += f64::from((h - b).abs());
        }
        errors.values += want_u8.len();
        println!("{:<12} {crop:?} -> {out_w}x{out_h}: max |u8 diff| {case_u8_max}", text(case, "name")?);
    }

    let pillow = text(&manifest, "pillow")?;
    println!("reference: Pillow {pillow}, torchvision {}", text(&manifest, "torchvision")?);
    for (name, e) in [("rrc", &rrc), ("eval", &eval)] {
        println!(
            "{name:>4}: {} values | u8 levels: max {}, mean {:.5}, differing {:.3}% | \
             normalised f32: max {:.3e}, mean {:.3e} | f16: max {:.3e}, mean {:.3e}",
            e.values,
            e.u8_max,
            e.u8_mean(),
            100.0 * e.u8_differing as f64 / e.values as f64,
            e.f32_max,
            e.f32_mean(),
            e.f16_max,
            e.f16_mean(),
        );
    }

    // Pillow before 13 always resizes horizontally first; we follow 13's order, which
    // rounds the intermediate image differently in some cases (by at most one level).
    let major: u32 = pillow.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    let level_slack = if major >= 13 { 0 } else { 1 };
    // One u8 level is 1 / (255 * std) ~ 0.0175 in normalised units; beyond the u8
    // differences, f32 differs by float rounding and f16 by half an f16 step (|x| < 2.7).
    let level = 1.0 / (255.0 * 0.224);
    assert!(rrc.values > 0 && eval.values > 0);
    for (name, e) in [("rrc", &rrc), ("eval", &eval)] {
        // The eval transform of an image taller than twice its width is resized
        // vertically first by Pillow >= 13, horizontally first by us (see augment.rs).
        let slack = if name == "eval" { 1 } else { level_slack };
        assert!(e.u8_max <= slack, "{name}: u8 max error {} > {slack}", e.u8_max);
        assert!(e.u8_mean() < 0.01, "{name}: u8 mean error {}", e.u8_mean());
        let f32_max = slack as f32 * level * 1.01 + 1e-6;
        assert!(e.f32_max <= f32_max, "{name}: f32 max error {} > {f32_max}", e.f32_max);
        assert!(e.f32_mean() < 0.01 * level as f64 + 1e-6, "{name}: f32 mean error {}", e.f32_mean());
        let f16_max = f32_max + 1.0 / 1024.0;
        assert!(e.f16_max <= f16_max, "{name}: f16 max error {} > {f16_max}", e.f16_max);
        assert!(e.f16_mean() < 0.01 * level as f64 + 5e-4, "{name}: f16 mean error {}", e.f16_mean());
    }
    Ok(())
}
