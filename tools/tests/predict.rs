//! `convnets predict` and fine-tuning, run as a user would (the binary, its output and exit
//! status): a model trained here on learnable synthetic data names the classes of images it
//! has not seen; bad files are reported by name without stopping the others; `train
//! --init-from` moves a backbone onto a dataset of another class count, loading exactly the
//! backbone, and `--freeze-backbone` leaves it untouched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use convnets_tools::synth::{class_name, wnid};
use tch::Tensor;

fn run(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_convnets"))
        .args(args)
        .output()?)
}

/// Runs `convnets args...`, which must succeed; returns its stdout.
fn ok(args: &[&str]) -> Result<String> {
    let out = run(args)?;
    if !out.status.success() {
        bail!(
            "convnets {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// synth -> pack: returns (synth folder, packed folder).
fn dataset(dir: &Path, classes: usize, train: usize, val: usize) -> Result<(PathBuf, PathBuf)> {
    let (images, packed) = (dir.join("synth"), dir.join("packed"));
    let n = |v: usize| v.to_string();
    ok(&[
        "synth",
        "-o",
        s(&images),
        "--classes",
        &n(classes),
        "--train-per-class",
        &n(train),
        "--val-per-class",
        &n(val),
        "--size",
        "40",
        "--seed",
        "3",
    ])?;
    ok(&[
        "pack-imagenet",
        "-i",
        s(&images),
        "-o",
        s(&packed),
        "-q",
        "--train-shards",
        "2",
        "--val-shards",
        "1",
    ])?;
    Ok((images, packed))
}

/// `train` of a resnet18 at 32x32 on the CPU, with `extra` flags.
fn train(packed: &Path, out: &Path, extra: &[&str]) -> Result<Output> {
    let mut args = vec![
        "train",
        "--data",
        s(packed),
        "--arch",
        "resnet18",
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--threads",
        "2",
        "--seed",
        "5",
        "-o",
        s(out),
    ];
    args.extend_from_slice(extra);
    let out = run(&args)?;
    if !out.status.success() {
        bail!(
            "convnets {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| path.display().to_string())?
        .into_iter()
        .collect())
}

/// The one `step-N` checkpoint a run kept.
fn step_checkpoint(run: &Path) -> Result<PathBuf> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    steps.sort();
    steps.pop().context("no step checkpoint")
}

#[test]
fn predicts_the_classes_of_unseen_images_with_names() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (images, packed) = dataset(tmp.path(), 4, 32, 10)?;
    let run_dir = tmp.path().join("run");
    train(
        &packed,
        &run_dir,
        &[
            "--epochs",
            "8",
            "--warmup-epochs",
            "1",
            "--lr",
            "2.0",
            "--log-every",
            "100",
        ],
    )?;
    let best = run_dir.join("checkpoints/best");

    // The val images as JPEG files (never trained on), a folder given as is; the run
    // folder resolves to its best checkpoint. A batch size that leaves a partial batch.
    let doc: serde_json::Value = serde_json::from_str(&ok(&[
        "predict",
        "--checkpoint",
        s(&run_dir),
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--batch-size",
        "7",
        "--top-k",
        "3",
        "--json",
        s(&images.join("val")),
    ])?)?;
    let predictions = doc["predictions"].as_array().context("predictions")?;
    assert_eq!(predictions.len(), 40);
    assert_eq!(
        (doc["images"].as_u64(), doc["failed"].as_u64()),
        (Some(40), Some(0))
    );
    let mut correct = 0;
    for p in predictions {
        let path = PathBuf::from(p["path"].as_str().context("path")?);
        let truth = path
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str())
            .context("class folder")?;
        let top = p["top"].as_array().context("top")?;
        assert_eq!(top.len(), 3);
        let probs: Vec<f64> = top
            .iter()
            .map(|t| t["probability"].as_f64().unwrap_or(-1.0))
            .collect();
        assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)), "{probs:?}");
        assert!(
            probs.windows(2).all(|w| w[0] >= w[1]),
            "best first: {probs:?}"
        );
        assert!(probs.iter().sum::<f64>() <= 1.0 + 1e-5, "{probs:?}");
        for t in top {
            // Names travel with the checkpoint: the dataset's classes, in label order.
            let class = t["class"].as_u64().context("class")? as usize;
            assert_eq!(t["wnid"], wnid(class).as_str());
            assert_eq!(t["name"], class_name(class).as_str());
        }
        correct += usize::from(top[0]["wnid"] == truth);
    }
    // Chance is 25 %; the trained model is well above it.
    assert!(correct >= 32, "{correct} of 40 correct");

    // The same images through `eval` (packed byte for byte, same transform): same top-1.
    let eval: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--data",
        s(&packed),
        "--checkpoint",
        s(&best),
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--threads",
        "2",
        "--json",
    ])?)?;
    assert_eq!(
        eval["top1"].as_f64(),
        Some(correct as f64 / 40.0),
        "predict and eval disagree"
    );

    // Without --image-size both use the size the checkpoint was trained at (32 here, not
    // 224): the same figures as with it.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(best.join("checkpoint.json"))?)?;
    assert_eq!(meta["image_size"], 32);
    let eval_default: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--data",
        s(&packed),
        "--checkpoint",
        s(&best),
        "--device",
        "cpu",
        "--threads",
        "2",
        "--json",
    ])?)?;
    assert_eq!(eval_default, eval);
    let doc_default: serde_json::Value = serde_json::from_str(&ok(&[
        "predict",
        "--checkpoint",
        s(&run_dir),
        "--device",
        "cpu",
        "--batch-size",
        "7",
        "--top-k",
        "3",
        "--json",
        s(&images.join("val")),
    ])?)?;
    assert_eq!(doc_default["predictions"], doc["predictions"]);
    assert_eq!(doc_default["image_size"], 32);

    // The table: files given one by one, names on the terminal.
    let one = images.join("val").join(wnid(2));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&one)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let table = ok(&[
        "predict",
        "--checkpoint",
        s(&best),
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--top-k",
        "2",
        s(&files[0]),
        s(&files[1]),
    ])?;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 1 + 2 * 2, "{table}");
    assert!(lines[0].starts_with("IMAGE"), "{table}");
    assert!(
        lines[1].starts_with(s(&files[0])) && lines[3].starts_with(s(&files[1])),
        "{table}"
    );
    assert!(table.contains(&class_name(2)), "{table}");
    Ok(())
}

#[test]
fn bad_files_are_named_and_the_others_still_predicted() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (images, packed) = dataset(tmp.path(), 2, 4, 2)?;
    let run_dir = tmp.path().join("run");
    // An untrained model is enough here: step 0 is saved before any training.
    train(
        &packed,
        &run_dir,
        &["--max-steps", "0", "--eval-every", "0", "--batch-size", "4"],
    )?;
    let ckpt = step_checkpoint(&run_dir)?;

    let folder = tmp.path().join("mixed");
    std::fs::create_dir_all(folder.join("sub"))?;
    let good: Vec<PathBuf> = std::fs::read_dir(images.join("val").join(wnid(0)))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(good.len(), 2);
    for (i, g) in good.iter().enumerate() {
        std::fs::copy(g, folder.join(format!("good{i}.JPEG")))?;
    }
    let jpeg = std::fs::read(&good[0])?;
    std::fs::write(folder.join("sub/corrupt.jpg"), &jpeg[..jpeg.len() / 3])?;
    std::fs::write(folder.join("notes.jpeg"), b"these are not pixels\n")?;
    std::fs::write(folder.join("ignored.txt"), b"not collected: not a .jpg")?;
    let png = tmp.path().join("image.png");
    image::RgbImage::new(8, 8).save(&png)?;

    let args = [
        "predict",
        "--checkpoint",
        s(&ckpt),
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--json",
        "--batch-size",
        "2",
        s(&folder),
        s(&png),
    ];
    let out = run(&args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failed file makes the exit status non-zero"
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let predicted: Vec<&str> = doc["predictions"]
        .as_array()
        .context("predictions")?
        .iter()
        .filter_map(|p| p["path"].as_str())
        .collect();
    let folder_s = s(&folder);
    assert_eq!(
        predicted,
        [
            format!("{folder_s}/good0.JPEG"),
            format!("{folder_s}/good1.JPEG")
        ]
    );
    let errors: Vec<(&str, &str)> = doc["errors"]
        .as_array()
        .context("errors")?
        .iter()
        .filter_map(|e| Some((e["path"].as_str()?, e["error"].as_str()?)))
        .collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    for (name, reason) in [
        ("notes.jpeg", "not a JPEG"),
        ("sub/corrupt.jpg", "corrupt JPEG"),
        ("image.png", "Png image, not a JPEG"),
    ] {
        let (path, error) = errors
            .iter()
            .find(|(p, _)| p.ends_with(name))
            .with_context(|| format!("{name} in {errors:?}"))?;
        assert!(error.contains(reason), "{name}: {error}");
        // One line per failed file on stderr, naming it.
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("error: ") && l.contains(path) && l.contains(error)),
            "{stderr}"
        );
    }
    assert!(
        stderr.contains("3 of 5 files could not be predicted"),
        "{stderr}"
    );

    // A checkpoint that is not there, or not a checkpoint: a clear error, nothing else.
    let out = run(&[
        "predict",
        "--checkpoint",
        s(&tmp.path().join("nothing")),
        s(&folder),
    ])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing: no such checkpoint or run folder"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["predict", "--checkpoint", s(&folder), s(&folder)])?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("neither a checkpoint folder"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weights = ckpt.join("model.safetensors");
    let out = run(&["predict", "--checkpoint", s(&weights), s(&folder)])?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--arch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bare weights file with --arch works (no names: class indices only).
    let table = ok(&[
        "predict",
        "--checkpoint",
        s(&weights),
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--top-k",
        "1",
        s(&folder.join("good0.JPEG")),
    ])?;
    assert_eq!(table.lines().count(), 2, "{table}");
    Ok(())
}

#[test]
fn fine_tuning_loads_the_backbone_and_a_new_classifier() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // 8 images a class in batches of 8: 2 and 3 steps an epoch.
    let (_, two) = dataset(&tmp.path().join("two"), 2, 8, 2)?;
    let (_, three) = dataset(&tmp.path().join("three"), 3, 8, 2)?;
    let source_run = tmp.path().join("source");
    train(
        &two,
        &source_run,
        &["--max-steps", "2", "--eval-every", "0", "--batch-size", "8"],
    )?;
    let source = tensors(&step_checkpoint(&source_run)?.join("model.safetensors"))?;
    assert_eq!(source["fc.weight"].size(), [2, 512]);

    // Step 0 of a run started from the source's run folder: its backbone, a fresh [3, 512] fc.
    let start = tmp.path().join("start");
    let out = train(
        &three,
        &start,
        &[
            "--init-from",
            s(&source_run),
            "--max-steps",
            "0",
            "--eval-every",
            "0",
            "--seed",
            "9",
            "--batch-size",
            "8",
        ],
    )?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("fc.weight and fc.bias are not loaded but initialised afresh as [3, 512]"),
        "{log}"
    );
    let start_ckpt = step_checkpoint(&start)?;
    let at_start = tensors(&start_ckpt.join("model.safetensors"))?;
    assert_eq!(at_start["fc.weight"].size(), [3, 512]);
    assert_eq!(at_start["fc.bias"].size(), [3]);
    let backbone = |t: &HashMap<String, Tensor>| -> Vec<String> {
        let mut names: Vec<String> = t
            .keys()
            .filter(|n| !n.starts_with("fc."))
            .cloned()
            .collect();
        names.sort();
        names
    };
    assert_eq!(backbone(&at_start), backbone(&source));
    for name in backbone(&source) {
        assert!(
            source[&name].equal(&at_start[&name]),
            "{name} differs from the source"
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(start_ckpt.join("checkpoint.json"))?)?;
    assert_eq!(
        meta["classes"].as_array().map(Vec::len),
        Some(3),
        "the new dataset's names"
    );

    // Frozen backbone (set from a recipe file): after training, the backbone (BN running
    // statistics included) is the source's and the classifier has moved from its start.
    let recipe = tmp.path().join("finetune.toml");
    std::fs::write(
        &recipe,
        format!(
            "init-from = {:?}\nfreeze-backbone = true\nlr = 1.0\nwarmup-epochs = 0\n",
            s(&source_run)
        ),
    )?;
    let frozen = tmp.path().join("frozen");
    train(
        &three,
        &frozen,
        &[
            "--recipe-file",
            s(&recipe),
            "--max-steps",
            "3",
            "--eval-every",
            "0",
            "--seed",
            "9",
            "--batch-size",
            "8",
        ],
    )?;
    let args: serde_json::Value =
        serde_json::from_slice(&std::fs::read(frozen.join("args.json"))?)?;
    assert_eq!(
        (
            args["freeze_backbone"].as_bool(),
            args["backbone_lr_scale"].as_f64()
        ),
        (Some(true), Some(1.0))
    );
    let after = tensors(&step_checkpoint(&frozen)?.join("model.safetensors"))?;
    for name in backbone(&source) {
        assert!(
            source[&name].equal(&after[&name]),
            "{name} changed under --freeze-backbone"
        );
    }
    for name in ["fc.weight", "fc.bias"] {
        assert!(!at_start[name].equal(&after[name]), "{name} did not train");
    }
    // The optimizer held the classifier only.
    let momentum = tensors(&step_checkpoint(&frozen)?.join("optimizer.safetensors"))?;
    let mut held: Vec<&String> = momentum.keys().collect();
    held.sort();
    assert_eq!(held, ["fc.bias", "fc.weight"]);

    // Mismatches other than the class count are errors naming the tensor.
    let mut broken = source
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect::<HashMap<_, _>>();
    broken.insert(
        "layer1.0.conv1.weight".into(),
        Tensor::zeros([64, 64, 1, 1], (tch::Kind::Float, tch::Device::Cpu)),
    );
    broken.remove("layer4.1.bn2.running_var");
    let file = tmp.path().join("broken.safetensors");
    Tensor::write_safetensors(&broken.into_iter().collect::<Vec<_>>(), &file)?;
    let out = run(&[
        "train",
        "--data",
        s(&three),
        "--arch",
        "resnet18",
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--init-from",
        s(&file),
        "--max-steps",
        "0",
        "-o",
        s(&tmp.path().join("broken-run")),
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("layer1.0.conv1.weight")
            && err.contains("layer4.1.bn2.running_var")
            && err.contains("broken.safetensors"),
        "{err}"
    );
    let out = run(&[
        "train",
        "--data",
        s(&three),
        "--arch",
        "resnet34",
        "--device",
        "cpu",
        "--init-from",
        s(&source_run),
        "-o",
        s(&tmp.path().join("other-arch")),
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds resnet18 weights but --arch is resnet34"),
        "{err}"
    );
    assert!(
        !tmp.path().join("other-arch/args.json").exists(),
        "refused before the run folder is made"
    );
    Ok(())
}

#[test]
fn eval_refuses_a_dataset_whose_classes_are_not_the_checkpoints() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (images, packed) = dataset(&tmp.path().join("four"), 4, 4, 1)?;
    let run_dir = tmp.path().join("run");
    train(
        &packed,
        &run_dir,
        &["--max-steps", "0", "--eval-every", "0", "--batch-size", "4"],
    )?;
    let eval = |data: &Path| {
        run(&[
            "eval",
            "--data",
            s(data),
            "--checkpoint",
            s(&run_dir),
            "--device",
            "cpu",
            "--threads",
            "2",
        ])
    };

    // One class more: an error naming both counts, not a panic on label 4.
    let (_, five) = dataset(&tmp.path().join("five"), 5, 4, 1)?;
    let out = eval(&five)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("trained on 4 classes") && err.contains("has 5"),
        "{err}"
    );

    // As many classes, another one among them: the labels would mean other classes.
    let renamed = tmp.path().join("renamed");
    std::fs::create_dir_all(&renamed)?;
    for split in ["train", "val"] {
        std::fs::create_dir_all(renamed.join(split))?;
        for c in 0..4 {
            let name = if c == 2 {
                format!("{}a", wnid(2))
            } else {
                wnid(c)
            };
            std::fs::rename(
                images.join(split).join(wnid(c)),
                renamed.join(split).join(name),
            )?;
        }
    }
    let other = tmp.path().join("other-packed");
    ok(&["pack-imagenet", "-i", s(&renamed), "-o", s(&other), "-q"])?;
    let out = eval(&other)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "class 2 is {0} in the checkpoint but {0}a",
            wnid(2)
        )),
        "{err}"
    );

    // The dataset it was trained on is fine.
    ok(&[
        "eval",
        "--data",
        s(&packed),
        "--checkpoint",
        s(&run_dir),
        "--device",
        "cpu",
        "--threads",
        "2",
    ])?;
    Ok(())
}
