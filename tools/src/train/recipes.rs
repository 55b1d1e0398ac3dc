//! Named recipes (the seed's training configurations) and TOML recipe files, both expanded
//! into command-line flags placed before the user's own, so that flags given on the
//! command line override them.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context};

/// (name, description, flags). Hyper-parameters as NVIDIA's ConvNets recipes give them:
/// LR 0.256 per 256 images, 8 warm-up epochs, cosine, label smoothing 0.1, momentum 0.875;
/// weight decay 1/32768 for ResNet-50, 1/16384 for the ResNeXts; mixup 0.2 for 250 epochs.
pub const RECIPES: &[(&str, &str, &[&str])] = &[
    (
        "rn50-90e",
        "ResNet-50 v1.5, 90 epochs",
        &[
            "--arch",
            "resnet50",
            "--epochs",
            "90",
            "--weight-decay",
            "3.0517578125e-05",
            "--mixup",
            "0",
        ],
    ),
    (
        "rn50-250e",
        "ResNet-50 v1.5, 250 epochs, mixup 0.2",
        &[
            "--arch",
            "resnet50",
            "--epochs",
            "250",
            "--weight-decay",
            "3.0517578125e-05",
            "--mixup",
            "0.2",
        ],
    ),
    (
        "rnxt101-90e",
        "ResNeXt101-32x4d, 90 epochs",
        &[
            "--arch",
            "resnext101_32x4d",
            "--epochs",
            "90",
            "--weight-decay",
            "6.103515625e-05",
            "--mixup",
            "0",
        ],
    ),
    (
        "rnxt101-250e",
        "ResNeXt101-32x4d, 250 epochs, mixup 0.2",
        &[
            "--arch",
            "resnext101_32x4d",
            "--epochs",
            "250",
            "--weight-decay",
            "6.103515625e-05",
            "--mixup",
            "0.2",
        ],
    ),
    (
        "sernxt101-90e",
        "SE-ResNeXt101-32x4d, 90 epochs",
        &[
            "--arch",
            "seresnext101_32x4d",
            "--epochs",
            "90",
            "--weight-decay",
            "6.103515625e-05",
            "--mixup",
            "0",
        ],
    ),
    (
        "sernxt101-250e",
        "SE-ResNeXt101-32x4d, 250 epochs, mixup 0.2",
        &[
            "--arch",
            "seresnext101_32x4d",
            "--epochs",
            "250",
            "--weight-decay",
            "6.103515625e-05",
            "--mixup",
            "0.2",
        ],
    ),
];

/// Flags every recipe shares.
const COMMON: &[&str] = &[
    "--lr",
    "0.256",
    "--warmup-epochs",
    "8",
    "--lr-schedule",
    "cosine",
    "--label-smoothing",
    "0.1",
    "--momentum",
    "0.875",
    "--zero-init-residual",
    "true",
];

/// The value following `flag` (as `--flag value` or `--flag=value`).
fn value_of(args: &[OsString], flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_string_lossy();
        if a == flag {
            args.get(i + 1).map(|v| v.to_string_lossy().into_owned())
        } else {
            a.strip_prefix(&prefix).map(str::to_string)
        }
    })
}

/// Expands `--recipe` and `--recipe-file` of a `train` command line. Returns None after
/// printing the list for `--recipe list`.
pub fn expand(args: Vec<OsString>) -> anyhow::Result<Option<Vec<OsString>>> {
    if args.get(1).is_none_or(|a| a != "train") {
        return Ok(Some(args));
    }
    let mut preset: Vec<OsString> = Vec::new();
    if let Some(name) = value_of(&args, "--recipe") {
        if name == "list" {
            for (name, what, flags) in RECIPES {
                println!(
                    "{name:<16} {what}: {} {}",
                    COMMON.join(" "),
                    flags.join(" ")
                );
            }
            return Ok(None);
        }
        let (_, _, flags) = RECIPES
            .iter()
            .find(|(n, _, _)| *n == name)
            .with_context(|| {
                let names: Vec<&str> = RECIPES.iter().map(|r| r.0).collect();
                format!("no recipe '{name}' (known: {})", names.join(", "))
            })?;
        preset.extend(COMMON.iter().chain(flags.iter()).map(OsString::from));
    }
    if let Some(file) = value_of(&args, "--recipe-file") {
        preset.extend(file_flags(Path::new(&file))?);
    }
    let mut out = Vec::with_capacity(args.len() + preset.len());
    out.extend(args[..2].iter().cloned());
    out.extend(preset);
    out.extend(args[2..].iter().cloned());
    Ok(Some(out))
}

/// `key = value` lines of a TOML recipe as flags: `epochs = 90` -> `--epochs 90`,
/// `nesterov = true` -> `--nesterov`, `lr-steps = [30, 60]` -> `--lr-steps 30,60`.
fn file_flags(path: &Path) -> anyhow::Result<Vec<OsString>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{}: not valid TOML", path.display()))?;
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        if matches!(
            key.as_str(),
            "recipe" | "recipe-file" | "recipe_file" | "output" | "resume"
        ) {
            bail!(
                "{}: '{key}' cannot be set from a recipe file",
                path.display()
            );
        }
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!(
                    "{}: '{key}' has an unsupported value {other}",
                    path.display()
                ),
            })
        };
        match &value {
            toml::Value::Boolean(true) => flags.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                let joined: anyhow::Result<Vec<String>> = items.iter().map(scalar).collect();
                flags.extend([flag.into(), joined?.join(",").into()]);
            }
            v => flags.extend([flag.into(), scalar(v)?.into()]),
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn recipes_go_first_so_the_command_line_wins() -> anyhow::Result<()> {
        let out = expand(os(&[
            "convnets",
            "train",
            "--recipe",
            "rn50-250e",
            "--epochs",
            "3",
            "-o",
            "r",
        ]))?
        .unwrap();
        let s: Vec<String> = out
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let first = s.iter().position(|a| a == "--epochs").unwrap();
        assert_eq!(s[first + 1], "250");
        assert_eq!(
            s.iter().rposition(|a| a == "--epochs").map(|i| &s[i + 1]),
            Some(&"3".to_string())
        );
        assert!(s.windows(2).any(|w| w == ["--mixup", "0.2"]));
        assert!(expand(os(&["convnets", "train", "--recipe", "rn51"]))
            .unwrap_err()
            .to_string()
            .contains("rn50-90e"));
        assert_eq!(
            expand(os(&["convnets", "pack-imagenet", "--recipe", "x"]))?
                .unwrap()
                .len(),
            4
        );
        Ok(())
    }

    #[test]
    fn toml_files_become_flags() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("r.toml");
        std::fs::write(&f, "epochs = 5\nlr_schedule = \"step\"\nlr-steps = [2, 4]\nnesterov = true\namp = false\nmixup = 0.1\n")?;
        let flags: Vec<String> = file_flags(&f)?
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for pair in [
            ["--epochs", "5"],
            ["--lr-schedule", "step"],
            ["--lr-steps", "2,4"],
            ["--mixup", "0.1"],
        ] {
            assert!(flags.windows(2).any(|w| w == pair), "{pair:?} in {flags:?}");
        }
        assert!(flags.contains(&"--nesterov".to_string()) && !flags.contains(&"--amp".to_string()));
        std::fs::write(&f, "output = \"x\"\n")?;
        assert!(file_flags(&f).is_err());
        std::fs::write(&f, "epochs = \n")?;
        assert!(file_flags(&f).unwrap_err().to_string().contains("r.toml"));
        Ok(())
    }
}
