//! The CPU augment step against torchvision on PIL images, the reference every ImageNet
//! recipe was tuned with. `reference_augment.py` (next to this file, run with the
//! workspace's `.venv`) writes generated images and torchvision's outputs for
//! RandomResizedCrop windows (`F.resized_crop` + `hflip`) and for the eval transform
//! (`Resize(256)` + `CenterCrop(224)`); we run [`Augmenter`] on the same windows:
//!
//! * rrc: the integer window, [`WindowEdges::Crop`] (the default);
//! * eval: [`CenterCrop::plan`]'s fractional window, [`WindowEdges::Image`];
//! * eval with crop edges: the same windows with the default augmenter, to measure what
//!   a loader that forgets `WindowEdges::Image` gets (only border pixels differ).
//!
//! Bounds (measured with Pillow 13.0, printed by the test): our resampling is Pillow's,
//! so the `u8` output is identical on rrc and eval (0 levels), the normalised `f32`
//! output differs by float rounding only (one multiply-add instead of divide, subtract,
//! divide), and `f16` by f16 rounding on top. Pillow before 13 always resizes
//! horizontally first, where 13 (and we) sometimes go vertically first: with it, up to
//! one level may differ.

use std::path::{Path, PathBuf};
use std::process::Command;

use convnets_pipeline::cpu::augment::{
    Augmenter, Layout, Normalize, OutputDtype, OutputSpec, WindowEdges,
};
use convnets_pipeline::plan::{CenterCrop, CropWindow};
use half::f16;
use serde_json::Value;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Error statistics of one configuration over all its cases.
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

    /// Adds one case; returns its largest `u8` difference.
    fn add(
        &mut self,
        got_u8: &[u8],
        got_f32: &[f32],
        got_f16: &[f32],
        want_u8: &[u8],
        want_f32: &[f32],
    ) -> u32 {
        assert_eq!(got_u8.len(), want_u8.len());
        assert_eq!(got_f32.len(), want_f32.len());
        let mut case_max = 0;
        for (&a, &b) in got_u8.iter().zip(want_u8) {
            let d = u32::from(a.abs_diff(b));
            case_max = case_max.max(d);
            self.u8_sum += u64::from(d);
            self.u8_differing += usize::from(d != 0);
        }
        self.u8_max = self.u8_max.max(case_max);
        for ((&a, &h), &b) in got_f32.iter().zip(got_f16).zip(want_f32) {
            self.f32_max = self.f32_max.max((a - b).abs());
            self.f32_sum += f64::from((a - b).abs());
            self.f16_max = self.f16_max.max((h - b).abs());
            self.f16_sum += f64::from((h - b).abs());
        }
        self.values += want_u8.len();
        case_max
    }

    fn print(&self, name: &str) {
        println!(
            "{name:>16}: {} values | u8 levels: max {}, mean {:.5}, differing {:.3}% | \
             normalised f32: max {:.3e}, mean {:.3e} | f16: max {:.3e}, mean {:.3e}",
            self.values,
            self.u8_max,
            self.u8_mean(),
            100.0 * self.u8_differing as f64 / self.values as f64,
            self.f32_max,
            self.f32_mean(),
            self.f16_max,
            self.f16_mean(),
        );
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
    v.get(key)
        .ok_or_else(|| format!("manifest entry lacks `{key}`: {v}"))
}

fn num(v: &Value, key: &str) -> Result<f64, String> {
    field(v, key)?
        .as_f64()
        .ok_or_else(|| format!("`{key}` is not a number in {v}"))
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    field(v, key)?
        .as_str()
        .ok_or_else(|| format!("`{key}` is not a string in {v}"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
        .collect()
}

/// The sample as `u8` NHWC, normalised `f32` NCHW and normalised `f16` NCHW (widened).
fn samples(
    augmenter: &mut Augmenter,
    (w, h, src): &(u32, u32, Vec<u8>),
    crop: &CropWindow,
    (out_w, out_h): (u32, u32),
) -> TestResult<(Vec<u8>, Vec<f32>, Vec<f32>)> {
    let mut sample = |dtype, layout, normalize| -> TestResult<Vec<u8>> {
        let spec = OutputSpec {
            width: out_w,
            height: out_h,
            dtype,
            layout,
            normalize,
        };
        let mut out = vec![0u8; spec.sample_bytes()];
        augmenter.crop_resize_into(src, *w, *h, crop, &spec, &mut out)?;
        Ok(out)
    };
    let normalize = Some(Normalize::default());
    let as_u8 = sample(OutputDtype::U8, Layout::Nhwc, None)?;
    let as_f32 = f32s(&sample(OutputDtype::F32, Layout::Nchw, normalize)?);
    let as_f16 = sample(OutputDtype::F16, Layout::Nchw, normalize)?
        .chunks_exact(2)
        .map(|b| f16::from_ne_bytes([b[0], b[1]]).to_f32())
        .collect();
    Ok((as_u8, as_f32, as_f16))
}

#[test]
fn augment_matches_torchvision() -> TestResult {
    let dir = tempfile::tempdir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_augment.py");
    let run = Command::new(python())
        .arg(&script)
        .arg(dir.path())
        .output()?;
    assert!(
        run.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );

    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json"))?)?;
    let normalize = Normalize::default();
    let as_f32 = |key| -> Result<Vec<f32>, String> {
        let list = field(&manifest, key)?.as_array().ok_or("not a list")?;
        Ok(list
            .iter()
            .filter_map(Value::as_f64)
            .map(|v| v as f32)
            .collect())
    };
    assert_eq!(
        as_f32("mean")?,
        normalize.mean,
        "script and Normalize::default() disagree"
    );
    assert_eq!(
        as_f32("std")?,
        normalize.std,
        "script and Normalize::default() disagree"
    );

    let images = field(&manifest, "images")?
        .as_array()
        .ok_or("images is not a list")?;
    let mut sources = Vec::new();
    for img in images {
        let (w, h) = (num(img, "width")? as u32, num(img, "height")? as u32);
        let rgb = std::fs::read(dir.path().join(text(img, "rgb")?))?;
        assert_eq!(rgb.len(), (w * h * 3) as usize);
        sources.push((w, h, rgb));
    }

    let mut train = Augmenter::new();
    let mut eval = Augmenter::with_edges(WindowEdges::Image);
    let (mut rrc_errors, mut eval_errors, mut eval_crop_errors) =
        (Errors::default(), Errors::default(), Errors::default());
    let cases = field(&manifest, "cases")?
        .as_array()
        .ok_or("cases is not a list")?;
    for case in cases {
        let name = text(case, "name")?;
        let source = &sources[num(case, "image")? as usize];
        let out_size = (
            num(case, "out_width")? as u32,
            num(case, "out_height")? as u32,
        );
        let want_u8 = std::fs::read(dir.path().join(text(case, "u8")?))?;
        let want_f32 = f32s(&std::fs::read(dir.path().join(text(case, "f32")?))?);
        match text(case, "path")? {
            "rrc" => {
                let crop = CropWindow {
                    x: num(case, "left")?,
                    y: num(case, "top")?,
                    width: num(case, "width")?,
                    height: num(case, "height")?,
                    flip: field(case, "flip")?.as_bool().ok_or("flip is not a bool")?,
                };
                let (a, b, c) = samples(&mut train, source, &crop, out_size)?;
                let max = rrc_errors.add(&a, &b, &c, &want_u8, &want_f32);
                println!("{name:<12} {crop:?} -> {out_size:?}: max |u8 diff| {max}");
            }
            "eval" => {
                let plan = CenterCrop {
                    resize: num(case, "resize")? as u32,
                    crop: num(case, "crop")? as u32,
                };
                let crop = plan.plan(source.0, source.1);
                let (a, b, c) = samples(&mut eval, source, &crop, out_size)?;
                let max = eval_errors.add(&a, &b, &c, &want_u8, &want_f32);
                let (a, b, c) = samples(&mut train, source, &crop, out_size)?;
                let max_crop = eval_crop_errors.add(&a, &b, &c, &want_u8, &want_f32);
                println!(
                    "{name:<12} {crop:?} -> {out_size:?}: max |u8 diff| {max} (crop edges: {max_crop})"
                );
            }
            other => return Err(format!("unknown path {other}").into()),
        }
    }

    let pillow = text(&manifest, "pillow")?;
    println!(
        "reference: Pillow {pillow}, torchvision {}",
        text(&manifest, "torchvision")?
    );
    rrc_errors.print("rrc");
    eval_errors.print("eval");
    eval_crop_errors.print("eval, crop edges");

    // Pillow before 13 always resizes horizontally first; we follow 13's order, which
    // rounds the intermediate image differently in some cases (by at most one level).
    let major: u32 = pillow
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let slack = if major >= 13 { 0 } else { 1 };
    // One u8 level is 1 / (255 * std) ~ 0.0175 in normalised units; beyond the u8
    // differences, f32 differs by float rounding and f16 by half an f16 step (|x| < 2.7).
    let level = 1.0 / (255.0 * 0.224);
    for (name, e) in [("rrc", &rrc_errors), ("eval", &eval_errors)] {
        assert!(e.values > 0, "{name}: no cases");
        assert!(
            e.u8_max <= slack,
            "{name}: u8 max error {} > {slack}",
            e.u8_max
        );
        assert!(
            e.u8_mean() <= 0.01 * slack as f64,
            "{name}: u8 mean error {}",
            e.u8_mean()
        );
        let f32_max = slack as f32 * level * 1.01 + 1e-6;
        assert!(
            e.f32_max <= f32_max,
            "{name}: f32 max error {} > {f32_max}",
            e.f32_max
        );
        assert!(
            e.f32_mean() <= 0.01 * (slack as f32 * level) as f64 + 2e-7,
            "{name}: f32 mean error {}",
            e.f32_mean()
        );
        let f16_max = f32_max + 1.0 / 1024.0;
        assert!(
            e.f16_max <= f16_max,
            "{name}: f16 max error {} > {f16_max}",
            e.f16_max
        );
        assert!(
            e.f16_mean() <= 0.01 * (slack as f32 * level) as f64 + 3e-4,
            "{name}: f16 mean error {}",
            e.f16_mean()
        );
    }
    // Crop edges on eval windows: only outputs whose filter crosses the window's edge
    // differ (the outermost one or two rows and columns, ~5% of values), but those by up
    // to tens of levels (34 measured, on a 2x upscale of noise).
    let e = &eval_crop_errors;
    let differing = e.u8_differing as f64 / e.values as f64;
    assert!(
        differing < 0.08,
        "eval, crop edges: {:.2}% of values differ",
        100.0 * differing
    );
    assert!(
        e.u8_mean() < 0.15,
        "eval, crop edges: u8 mean error {}",
        e.u8_mean()
    );
    Ok(())
}
