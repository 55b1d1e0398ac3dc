//! Weight I/O in safetensors, with torchvision/timm `state_dict` names.
//!
//! A file written by `safetensors.torch.save_file(model.state_dict(), path)` for the matching
//! torchvision/timm model loads with [`load_safetensors`]; a file written by
//! [`save_safetensors`] loads with `model.load_state_dict(safetensors.torch.load_file(path))`.
//! Loading is strict, like `load_state_dict(strict=True)`: every name the model has must be in
//! the file with the same shape, and the file may hold nothing else. One exception, also
//! PyTorch's: a missing `*.num_batches_tracked` (files from PyTorch < 0.4.1) is set to 0.
//! [`load_tensors_except`] is as strict about every name but those it is told to leave out.

use std::collections::HashMap;
use std::path::Path;

use tch::nn::VarStore;
use tch::{no_grad, Device, Kind, Tensor};

use crate::error::{Error, Mismatch, MismatchReport, Result};

/// What [`load_safetensors`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSummary {
    /// Tensors copied from the file.
    pub loaded: usize,
    /// `num_batches_tracked` buffers absent from the file, set to 0 (as PyTorch does).
    pub defaulted: Vec<String>,
}

const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16
    )
}

/// Compares a model's variables with named tensors (from a file): the strict-load verdict.
///
/// Shapes must be equal; kinds need only be in the same family (floating point or integer),
/// as `load_state_dict` converts fp16 to fp32 and the like on copy.
pub fn compare(model: &HashMap<String, Tensor>, file: &HashMap<String, Tensor>) -> MismatchReport {
    let mut report = MismatchReport::default();
    for (name, var) in model {
        match file.get(name) {
            None if name.ends_with(NUM_BATCHES_TRACKED) => {}
            None => report.missing.push(name.clone()),
            Some(found) => {
                let (expected_shape, found_shape) = (var.size(), found.size());
                let (expected_kind, found_kind) = (var.kind(), found.kind());
                if expected_shape != found_shape || is_float(expected_kind) != is_float(found_kind)
                {
                    report.mismatched.push(Mismatch {
                        name: name.clone(),
                        expected_shape,
                        found_shape,
                        expected_kind,
                        found_kind,
                    });
                }
            }
        }
    }
    report.unexpected = file
        .keys()
        .filter(|name| !model.contains_key(*name))
        .cloned()
        .collect();
    report.missing.sort();
    report.unexpected.sort();
    report.mismatched.sort_by(|a, b| a.name.cmp(&b.name));
    report
}

/// Reads every tensor of a safetensors file (onto the CPU).
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    check_safetensors_layout(path)?;
    let named = Tensor::read_safetensors(path).map_err(|source| Error::ReadWeights {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(named.into_iter().collect())
}

/// A safetensors file starts with the length of its JSON header (8 bytes, little-endian)
/// and the header itself (`{...}`), within the file. Anything else is refused by name
/// here; the parser would call it "HeaderTooLarge" or "InvalidHeader".
fn check_safetensors_layout(path: &Path) -> Result<()> {
    use std::io::Read;
    let not = |reason: String| Error::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    // An unreadable file is the parser's to report (with the OS's reason).
    let Ok(mut file) = std::fs::File::open(path) else {
        return Ok(());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut head = [0u8; 9];
    if len < 10 || file.read_exact(&mut head).is_err() {
        return Err(not(format!("{len} bytes, too short for a header")));
    }
    let header_len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if header_len > len - 8 || head[8] != b'{' {
        return Err(not(format!(
            "its first 8 bytes give a header of {header_len} bytes in a file of {len}, \
             followed by {:#04x} instead of `{{`",
            head[8]
        )));
    }
    Ok(())
}

/// Loads a torchvision/timm-named safetensors file into the variables of `vs` (strictly).
///
/// Values are converted to each variable's kind, device and layout (a channels_last model stays
/// channels_last). Nothing is written unless the whole file matches: on a mismatch the model is
/// untouched and the error lists the missing, unexpected and mismatched names.
pub fn load_safetensors(vs: &VarStore, path: impl AsRef<Path>) -> Result<LoadSummary> {
    let path = path.as_ref();
    let file = read_safetensors(path)?;
    load_tensors_except(vs, path, &file, &[])
}

/// [`load_safetensors`] for tensors already read from `path` (named in errors), except the
/// names in `except`: those are neither required nor loaded, on either side, and keep the
/// model's values. Fine-tuning onto another class count passes `["fc.weight", "fc.bias"]`.
/// Everything else is as strict as [`load_safetensors`].
pub fn load_tensors_except(
    vs: &VarStore,
    path: &Path,
    file: &HashMap<String, Tensor>,
    except: &[&str],
) -> Result<LoadSummary> {
    let kept = |name: &String| !except.contains(&name.as_str());
    let model: HashMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| kept(name))
        .collect();
    let file: HashMap<String, Tensor> = file
        .iter()
        .filter(|(name, _)| kept(name))
        .map(|(name, t)| (name.clone(), t.shallow_clone()))
        .collect();
    let report = compare(&model, &file);
    if !report.is_empty() {
        return Err(Error::WeightMismatch {
            path: path.to_path_buf(),
            report,
        });
    }
    let mut summary = LoadSummary::default();
    let mut names: Vec<&String> = model.keys().collect();
    names.sort();
    for name in names {
        let mut var = model[name].shallow_clone();
        let copied = match file.get(name) {
            Some(src) => {
                summary.loaded += 1;
                no_grad(|| var.f_copy_(src))
            }
            None => {
                summary.defaulted.push(name.clone());
                no_grad(|| var.f_zero_()).map(|_| ())
            }
        };
        copied.map_err(|source| Error::CopyWeight {
            path: path.to_path_buf(),
            name: name.clone(),
            source,
        })?;
    }
    Ok(summary)
}

/// Saves every variable of `vs` (parameters and BN buffers) to a safetensors file that
/// `safetensors.torch.load_file` + `load_state_dict` accept.
///
/// Tensors are written contiguous (NCHW) from the CPU whatever the model's device and layout.
/// The file is written next to `path`, fsynced and renamed into place, so a crash never
/// leaves a truncated file under the final name.
pub fn save_safetensors(vs: &VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let write_err = |source: Box<dyn std::error::Error + Send + Sync>| Error::WriteWeights {
        path: path.to_path_buf(),
        source,
    };
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in vs.variables() {
        let cpu = no_grad(|| var.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous())?;
        named.push((name, cpu));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    convnets_formats::atomic::write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(&named, tmp).map_err(std::io::Error::other)
    })
    .map_err(|e| write_err(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resnet::{resnet18, ModelConfig};
    use std::path::PathBuf;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn a_file_that_is_not_safetensors_is_named_as_such() -> TestResult {
        let dir = tempfile::tempdir()?;
        let text = dir.path().join("notes.safetensors");
        std::fs::write(
            &text,
            "these are not weights, just a long enough line of text",
        )?;
        let err = read_safetensors(&text).expect_err("text is not safetensors");
        assert!(matches!(err, Error::NotSafetensors { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("notes.safetensors is not a safetensors file"),
            "{err}"
        );
        let short = dir.path().join("short.safetensors");
        std::fs::write(&short, [1u8, 2, 3])?;
        assert!(matches!(
            read_safetensors(&short),
            Err(Error::NotSafetensors { .. })
        ));
        // A real file passes the check.
        let real = tiny_file(
            dir.path(),
            &[("w", Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu)))],
        )?;
        assert_eq!(read_safetensors(&real)?.len(), 1);
        Ok(())
    }

    fn tiny_file(dir: &Path, tensors: &[(&str, Tensor)]) -> Result<PathBuf> {
        let path = dir.join("w.safetensors");
        Tensor::write_safetensors(tensors, &path)?;
        Ok(path)
    }

    #[test]
    fn round_trip_and_strictness() -> TestResult {
        let dir = tempfile::tempdir()?;
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let _model = resnet18(&vs.root(), 10, &ModelConfig::default())?;
        let path = dir.path().join("r18.safetensors");
        save_safetensors(&vs, &path)?;
        assert!(!convnets_formats::atomic::temp_path(&path).exists());

        tch::manual_seed(4);
        let other = VarStore::new(Device::Cpu);
        let _model = resnet18(&other.root(), 10, &ModelConfig::default())?;
        let summary = load_safetensors(&other, &path)?;
        assert_eq!(summary.loaded, 122);
        assert!(summary.defaulted.is_empty());
        let (a, b) = (vs.variables(), other.variables());
        for (name, t) in &a {
            assert!(t.f_equal(&b[name])?, "{name} differs after the round trip");
        }

        // Wrong class count: two shape mismatches, nothing copied.
        let wrong = VarStore::new(Device::Cpu);
        let _model = resnet18(&wrong.root(), 5, &ModelConfig::default())?;
        let before = wrong.variables()["conv1.weight"].f_detach_copy()?;
        match load_safetensors(&wrong, &path) {
            Err(Error::WeightMismatch { report, .. }) => {
                let names: Vec<&str> = report.mismatched.iter().map(|m| m.name.as_str()).collect();
                assert_eq!(names, ["fc.bias", "fc.weight"]);
                assert!(report.missing.is_empty() && report.unexpected.is_empty());
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
        assert!(wrong.variables()["conv1.weight"].f_equal(&before)?);
        Ok(())
    }

    #[test]
    fn except_leaves_named_tensors_alone() -> TestResult {
        let dir = tempfile::tempdir()?;
        let vs = VarStore::new(Device::Cpu);
        let _model = resnet18(&vs.root(), 10, &ModelConfig::default())?;
        let path = dir.path().join("r18.safetensors");
        save_safetensors(&vs, &path)?;
        let file = read_safetensors(&path)?;

        // Another class count: the classifier is left out, everything else loads.
        let other = VarStore::new(Device::Cpu);
        let _model = resnet18(&other.root(), 3, &ModelConfig::default())?;
        let fc_before = other.variables()["fc.weight"].f_detach_copy()?;
        let summary = load_tensors_except(&other, &path, &file, &["fc.weight", "fc.bias"])?;
        assert_eq!(summary.loaded, 120);
        let (a, b) = (vs.variables(), other.variables());
        assert!(a["layer4.1.conv2.weight"].f_equal(&b["layer4.1.conv2.weight"])?);
        assert!(b["fc.weight"].f_equal(&fc_before)?);
        assert_eq!(b["fc.weight"].size(), [3, 512]);

        // Excepting the classifier does not excuse any other mismatch.
        let wrong = VarStore::new(Device::Cpu);
        let _model = crate::resnet::resnet34(&wrong.root(), 3, &ModelConfig::default())?;
        let err = load_tensors_except(&wrong, &path, &file, &["fc.weight", "fc.bias"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("layer1.2.conv1.weight") && !err.contains("fc."),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn reports_missing_and_unexpected() -> TestResult {
        let dir = tempfile::tempdir()?;
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _w = root
            .sub("a")
            .f_var("weight", &[2, 3], tch::nn::Init::Const(0.0))?;
        let _b = root
            .sub("a")
            .f_var("bias", &[2], tch::nn::Init::Const(0.0))?;
        let counter = Tensor::f_ones([], (Kind::Int64, Device::Cpu))?;
        let _n = root.sub("bn").add("num_batches_tracked", counter, false);
        let path = tiny_file(
            dir.path(),
            &[
                (
                    "a.weight",
                    Tensor::f_ones([2, 3], (Kind::Half, Device::Cpu))?,
                ),
                ("extra", Tensor::f_ones([1], (Kind::Float, Device::Cpu))?),
            ],
        )?;
        let err = load_safetensors(&vs, &path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("1 missing from the file:\n    a.bias"),
            "{err}"
        );
        assert!(
            err.contains("1 unexpected in the file:\n    extra"),
            "{err}"
        );
        assert!(!err.contains("num_batches_tracked"), "{err}");

        // Without the extra tensor and with a.bias: loads, fp16 converted, counter zeroed.
        let path = tiny_file(
            dir.path(),
            &[
                (
                    "a.weight",
                    Tensor::f_ones([2, 3], (Kind::Half, Device::Cpu))?,
                ),
                ("a.bias", Tensor::f_ones([2], (Kind::Float, Device::Cpu))?),
            ],
        )?;
        let summary = load_safetensors(&vs, &path)?;
        assert_eq!(summary.loaded, 2);
        assert_eq!(summary.defaulted, ["bn.num_batches_tracked"]);
        let vars = vs.variables();
        assert_eq!(vars["a.weight"].kind(), Kind::Float);
        assert_eq!(
            vars["a.weight"].f_sum(Kind::Double)?.f_double_value(&[])?,
            6.0
        );
        assert_eq!(vars["bn.num_batches_tracked"].f_int64_value(&[])?, 0);
        Ok(())
    }

    #[test]
    fn integer_into_float_is_a_mismatch() -> TestResult {
        let dir = tempfile::tempdir()?;
        let vs = VarStore::new(Device::Cpu);
        let _w = vs.root().f_var("w", &[2], tch::nn::Init::Const(0.0))?;
        let path = tiny_file(
            dir.path(),
            &[("w", Tensor::f_ones([2], (Kind::Int64, Device::Cpu))?)],
        )?;
        let err = load_safetensors(&vs, &path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("w: model [2] Float, file [2] Int64"), "{err}");
        Ok(())
    }
}
