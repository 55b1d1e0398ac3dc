//! Numerical equivalence with torchvision / timm, both ways, on the CPU in fp32.
//!
//! Each test runs `make_reference.py reference` (next to this file) with the workspace venv to
//! get a torchvision/timm model's weights (BN randomised), inputs, eval-mode logits and one
//! training step's loss, gradients and updated BN buffers; loads the weights into our model,
//! and compares. Then it takes an SGD step in Rust, saves our weights, and has
//! `make_reference.py check-rust` load them into the torchvision/timm model (strictly) and
//! compare its logits with ours.
//!
//! The venv (`.venv` at the workspace root, with torch, torchvision, timm, safetensors) is
//! required: without it these tests fail rather than skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use convnets_models::weights::{load_safetensors, read_safetensors, save_safetensors};
use convnets_models::{Arch, ModelConfig};
use tch::nn::VarStore;
use tch::{no_grad, Device, Kind, Reduction, Tensor};

/// Eval-mode logits: max |ours - theirs| <= LOGITS_RTOL * max |theirs| (the 1e-4).
const LOGITS_RTOL: f64 = 1e-4;
/// Training-mode loss, logits, gradients and BN buffers, same measure. Batch statistics over
/// 2 x 2 x 2 values in layer4 of a 64x64 input amplify rounding differences a little.
const TRAIN_RTOL: f64 = 1e-3;
/// Relative size of the random change made to every parameter before exporting our weights.
const PERTURBATION: f64 = 0.02;

struct Case {
    arch: Arch,
    num_classes: i64,
    batch: i64,
    height: i64,
    width: i64,
}

impl Case {
    fn spec(&self) -> String {
        let Case {
            arch,
            num_classes,
            batch,
            height,
            width,
        } = self;
        format!("{arch}:{num_classes}:{batch}:{height}:{width}")
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's interpreter; its absence is a test failure with instructions.
fn python() -> Result<PathBuf> {
    let python = workspace_root().join(".venv/bin/python");
    ensure!(
        python.exists(),
        "the reference Python environment is missing: {} does not exist. These tests need the \
         workspace venv with torch, torchvision, timm and safetensors (scripts/setup creates it).",
        python.display()
    );
    Ok(python)
}

fn run_script(mode: &str, dir: &Path, case: &Case) -> Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make_reference.py");
    let output = Command::new(python()?)
        .arg(&script)
        .arg(mode)
        .arg(dir)
        .arg(case.spec())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "make_reference.py {mode} {} failed ({}):\n{stdout}\n{stderr}",
        case.spec(),
        output.status
    );
    Ok(stdout)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.f_double_value(&[])?)
}

/// max |ours - theirs| / max |theirs|, or a description of why they cannot be compared.
fn rel_diff(ours: &Tensor, theirs: &Tensor) -> Result<f64> {
    ensure!(
        ours.size() == theirs.size(),
        "shape {:?} vs reference {:?}",
        ours.size(),
        theirs.size()
    );
    let ours = ours.f_to_kind(Kind::Double)?;
    let theirs = theirs.f_to_kind(Kind::Double)?;
    let diff = scalar(&ours.f_sub(&theirs)?.f_abs()?.f_max()?)?;
    let scale = scalar(&theirs.f_abs()?.f_max()?)?;
    Ok(if diff == 0.0 { 0.0 } else { diff / scale })
}

/// Collects every difference of one case, so a failing run shows all of them at once.
#[derive(Default)]
struct Comparisons {
    failures: Vec<String>,
    /// Largest relative difference among the comparisons that passed.
    worst: f64,
}

impl Comparisons {
    fn close(&mut self, what: &str, ours: &Tensor, theirs: &Tensor, rtol: f64) {
        match rel_diff(ours, theirs) {
            Ok(rel) if rel <= rtol => self.worst = self.worst.max(rel),
            Ok(rel) => self.failures.push(format!(
                "{what}: relative max difference {rel:.3e} > {rtol:e}"
            )),
            Err(e) => self.failures.push(format!("{what}: {e}")),
        }
    }
}

/// One case at a time: libtorch (here and in Python) already uses every core, and two cases
/// side by side on a 2-core machine take twice as long as one after the other (OpenMP threads
/// spinning against each other).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn check(case: &Case) -> Result<()> {
    // A panic in another case poisons the lock; that case has already failed on its own.
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let arch = case.arch;
    let dir = tempfile::tempdir()?;
    run_script("reference", dir.path(), case)?;
    let t_reference = started.elapsed();

    let vs = VarStore::new(Device::Cpu);
    let model = arch.build(&vs.root(), case.num_classes, &ModelConfig::default())?;
    let summary = load_safetensors(&vs, dir.path().join(format!("{arch}.safetensors")))?;
    ensure!(
        summary.defaulted.is_empty(),
        "{arch}: defaulted {:?}",
        summary.defaulted
    );
    let io = read_safetensors(dir.path().join(format!("{arch}_io.safetensors")))?;
    let get = |name: &str| {
        io.get(name)
            .with_context(|| format!("{arch}_io lacks {name}"))
    };
    let input = get("input")?;
    let labels = get("labels")?;
    let mut cmp = Comparisons::default();

    // Eval mode.
    let logits = no_grad(|| model.f_forward_t(input, false))?;
    let eval_rel = rel_diff(&logits, get("logits_eval")?)?;
    cmp.close("eval logits", &logits, get("logits_eval")?, LOGITS_RTOL);

    // One training-mode forward + backward.
    let logits = model.f_forward_t(input, true)?;
    let loss = logits.f_cross_entropy_loss(labels, None::<Tensor>, Reduction::Mean, -100, 0.0)?;
    loss.backward();
    cmp.close("train logits", &logits, get("logits_train")?, TRAIN_RTOL);
    cmp.close("train loss", &loss, get("loss_train")?, TRAIN_RTOL);
    let vars = vs.variables();
    let mut n_grads = 0;
    let mut n_buffers = 0;
    for (key, reference) in &io {
        if let Some(name) = key.strip_prefix("grad.") {
            let var = vars
                .get(name)
                .with_context(|| format!("model has no {name}"))?;
            let grad = var.grad();
            if !grad.defined() {
                cmp.failures.push(format!("{name}: no gradient"));
                continue;
            }
            n_grads += 1;
            cmp.close(key, &grad, reference, TRAIN_RTOL);
        } else if let Some(name) = key.strip_prefix("after_train.") {
            let var = vars
                .get(name)
                .with_context(|| format!("model has no {name}"))?;
            n_buffers += 1;
            if var.kind() == Kind::Int64 {
                if !var.f_equal(reference)? {
                    cmp.failures
                        .push(format!("{key}: {var} vs reference {reference}"));
                }
            } else {
                cmp.close(key, var, reference, TRAIN_RTOL);
            }
        }
    }
    ensure!(
        n_grads >= 8 && n_buffers >= 5,
        "{arch}: only {n_grads} grads / {n_buffers} buffers"
    );
    let t_rust = started.elapsed();

    // The other direction: export our weights and load them into torchvision/timm. The
    // training step above moved the BN running statistics and counters; perturb every
    // parameter too (by a few %, keeping activations well scaled), so that nothing the
    // reference model ends up with comes from its own file.
    tch::manual_seed(7);
    no_grad(|| -> Result<()> {
        for mut var in vs.trainable_variables() {
            let noise = var
                .f_randn_like()?
                .f_mul_scalar(PERTURBATION)?
                .f_add_scalar(1.0)?;
            let _ = var.f_mul_(&noise)?;
        }
        Ok(())
    })?;
    save_safetensors(&vs, dir.path().join(format!("{arch}.rust.safetensors")))?;
    let logits = no_grad(|| model.f_forward_t(input, false))?;
    // BN counters were 7 in the reference file; the training step made them 8.
    let counter = Tensor::f_from_slice(&[8i64])?.f_reshape([])?;
    let rust_io = [
        ("input", input.shallow_clone()),
        ("logits_eval", logits),
        ("expected_num_batches_tracked", counter),
    ];
    Tensor::write_safetensors(
        &rust_io,
        dir.path().join(format!("{arch}.rust_io.safetensors")),
    )?;
    let report = run_script("check-rust", dir.path(), case)?;

    eprintln!(
        "{arch}: eval logits rel. diff {eval_rel:.1e}; worst over those, train logits, loss, \
         {n_grads} grads, {n_buffers} buffers {:.1e}; reference {:.1}s, rust {:.1}s, export+check {:.1}s\n  {}",
        cmp.worst,
        t_reference.as_secs_f64(),
        (t_rust - t_reference).as_secs_f64(),
        (started.elapsed() - t_rust).as_secs_f64(),
        report.trim()
    );
    if !cmp.failures.is_empty() {
        let list = cmp.failures.join("\n  ");
        bail!(
            "{arch} differs from {}:\n  {list}",
            arch.reference_library()
        );
    }
    Ok(())
}

#[test]
fn resnet18_matches_torchvision() -> Result<()> {
    check(&Case {
        arch: Arch::ResNet18,
        num_classes: 10,
        batch: 4,
        height: 96,
        width: 128,
    })
}

#[test]
fn resnet50_matches_torchvision() -> Result<()> {
    check(&Case {
        arch: Arch::ResNet50,
        num_classes: 1000,
        batch: 2,
        height: 224,
        width: 224,
    })
}

#[test]
fn resnext101_32x4d_matches_timm() -> Result<()> {
    check(&Case {
        arch: Arch::ResNeXt101_32x4d,
        num_classes: 1000,
        batch: 2,
        height: 64,
        width: 64,
    })
}

#[test]
fn seresnext101_32x4d_matches_timm() -> Result<()> {
    check(&Case {
        arch: Arch::SeResNeXt101_32x4d,
        num_classes: 100,
        batch: 2,
        height: 64,
        width: 64,
    })
}
