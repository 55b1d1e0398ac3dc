//! `convnets train` / `convnets eval` end to end on CPU: a learnable synthetic dataset made
//! here goes synth -> pack -> train (resnet18 at low resolution) -> eval, and a run stopped
//! mid-epoch and resumed gives exactly the per-step losses of an uninterrupted run.

mod common;

use std::path::Path;

use anyhow::{Context, Result};
use common::*;

/// A small learnable dataset, packed; returns the packed folder.
fn dataset(dir: &Path, classes: usize, train: usize, val: usize) -> Result<std::path::PathBuf> {
    let images = dir.join("synth");
    let packed = dir.join("packed");
    let s = |n: usize| n.to_string();
    convnets(&[
        "synth",
        "--output",
        images.to_str().unwrap(),
        "--classes",
        &s(classes),
        "--train-per-class",
        &s(train),
        "--val-per-class",
        &s(val),
        "--size",
        "40",
        "--seed",
        "3",
    ])?;
    pack_shards(&images, &packed, 2, 1, &[])?;
    Ok(packed)
}

fn train_args<'a>(packed: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--data",
        packed,
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
        out,
    ];
    args.extend_from_slice(extra);
    args
}

fn train_losses(run: &Path) -> Result<Vec<(u64, f64)>> {
    let text = std::fs::read_to_string(run.join("log.jsonl"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["type"] == "train" {
            out.push((
                v["step"].as_u64().context("step")?,
                v["loss"].as_f64().context("loss")?,
            ));
        }
    }
    Ok(out)
}

#[test]
fn learns_then_eval_agrees_with_the_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let packed = dataset(tmp.path(), 4, 32, 10)?;
    let run = tmp.path().join("run");
    let (p, r) = (packed.to_str().unwrap(), run.to_str().unwrap());
    convnets(&train_args(
        p,
        r,
        &[
            "--epochs",
            "6",
            "--warmup-epochs",
            "1",
            "--lr",
            "2.0",
            "--log-every",
            "4",
        ],
    ))?;

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json"))?)?;
    let top1 = summary["final_eval"]["top1"]
        .as_f64()
        .context("final top1")?;
    // Chance is 25 %; the synthetic classes are easy once learnt.
    assert!(top1 >= 0.7, "top-1 after 6 epochs: {top1}");
    assert_eq!(
        summary["final_eval"]["images"], 40,
        "every val image exactly once"
    );
    let losses = train_losses(&run)?;
    assert!(losses.len() >= 6);
    assert!(
        losses.last().unwrap().1 < losses[0].1,
        "loss did not fall: {losses:?}"
    );
    let log = std::fs::read_to_string(run.join("log.jsonl"))?;
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"type\":\"eval\""))
            .count(),
        6
    );
    // No --loader: `auto` chose the CPU loader (the model trains on the CPU) and says why.
    assert_eq!(summary["loader"], "Cpu");
    let why = summary["loader_choice"].as_str().context("loader_choice")?;
    assert!(why.contains("--loader auto: the CPU loader"), "{why}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"type\":\"loader\""))
            .count(),
        1
    );
    // One record per whole epoch, with its rate and what its boundary took.
    let epochs: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("\"type\":\"epoch\""))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(epochs.len(), 6);
    assert!(epochs.iter().all(
        |e| e["img_s"].as_f64().is_some_and(|r| r > 0.0) && e["boundary_s"].as_f64().is_some()
    ));
    assert_eq!(summary["epoch_img_s"].as_array().map(Vec::len), Some(6));

    // `convnets eval` on the best checkpoint reproduces the best epoch's figure.
    let best = run.join("checkpoints/best");
    assert!(best.join("model.safetensors").is_file() && best.join("checkpoint.json").is_file());
    let checkpoints: Vec<_> = std::fs::read_dir(run.join("checkpoints"))?.collect();
    assert_eq!(checkpoints.len(), 3, "keep last 2 + best");
    convnets(&[
        "eval",
        "--data",
        p,
        "--checkpoint",
        best.to_str().unwrap(),
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--batch-size",
        "7",
        "--threads",
        "2",
        "--json",
    ])?;
    let best_top1 = summary["best_top1"].as_f64().context("best")?;
    assert!(best_top1 >= top1);

    // The plot of the run draws.
    convnets(&["plot", r])?;
    assert!(run.join("curves.png").is_file());
    Ok(())
}

#[test]
fn resume_from_mid_epoch_equals_the_uninterrupted_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let packed = dataset(tmp.path(), 3, 12, 3)?;
    let p = packed.to_str().unwrap();
    let (full, split) = (tmp.path().join("full"), tmp.path().join("split"));
    // Mixup and EMA on, so their state and randomness are covered by the resume too.
    let common = [
        "--epochs",
        "2",
        "--log-every",
        "1",
        "--warmup-epochs",
        "0.5",
        "--eval-every",
        "1",
        "--mixup",
        "0.2",
        "--ema",
        "0.9",
    ];
    convnets(&train_args(p, full.to_str().unwrap(), &common))?;

    // Stop after 3 steps (epoch 0 has 36/16 = 2 steps, so mid epoch 1), then resume.
    let mut stop = common.to_vec();
    stop.extend_from_slice(&["--max-steps", "3"]);
    convnets(&train_args(p, split.to_str().unwrap(), &stop))?;
    assert_eq!(train_losses(&split)?.len(), 3);
    convnets(&["train", "--resume", "-o", split.to_str().unwrap()])?;

    let (a, b) = (train_losses(&full)?, train_losses(&split)?);
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "per-step losses differ after resume");
    let evals = |run: &Path| -> Result<Vec<String>> {
        Ok(std::fs::read_to_string(run.join("log.jsonl"))?
            .lines()
            .filter(|l| l.contains("\"eval\""))
            .map(String::from)
            .collect())
    };
    assert_eq!(
        evals(&full)?,
        evals(&split)?,
        "evaluations of the EMA weights differ"
    );
    let best = split.join("checkpoints/best");
    assert!(best.join("ema.safetensors").is_file());
    convnets(&[
        "eval",
        "--data",
        p,
        "--checkpoint",
        best.to_str().unwrap(),
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--ema",
    ])?;
    // Starting a second run in the same folder is refused.
    let err = convnets(&train_args(p, split.to_str().unwrap(), &common)).unwrap_err();
    assert!(message(&err).contains("--resume"), "{}", message(&err));
    Ok(())
}

#[test]
fn recipes_set_flags_that_the_command_line_overrides() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let packed = dataset(tmp.path(), 2, 8, 2)?;
    let run = tmp.path().join("run");
    let recipe = tmp.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        "warmup_epochs = 0\nlr-schedule = \"step\"\nlr-steps = [1]\nlog-every = 1\n",
    )?;
    convnets(&train_args(
        packed.to_str().unwrap(),
        run.to_str().unwrap(),
        &[
            "--recipe",
            "rn50-250e",
            "--recipe-file",
            recipe.to_str().unwrap(),
            "--epochs",
            "1",
        ],
    ))?;
    let args: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("args.json"))?)?;
    assert_eq!(args["epochs"], 1, "command line over recipe");
    assert_eq!(args["arch"], "resnet18", "command line over recipe");
    assert_eq!(args["mixup"], 0.2, "from the recipe");
    assert_eq!(args["lr_schedule"], "Step", "from the file");
    assert_eq!(args["lr_steps"], serde_json::json!([1.0]));
    assert_eq!(
        args["zero_init_residual"], true,
        "the seed's choice, from the recipe"
    );
    let e = convnets(&["train", "--recipe", "rn99", "-o", "x"]).unwrap_err();
    assert!(message(&e).contains("rn50-90e"), "{}", message(&e));
    Ok(())
}

#[test]
fn bad_requests_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let e = convnets(&[
        "train",
        "--arch",
        "resnet18",
        "--device",
        "cpu",
        "--amp",
        "-o",
        o,
        "--loader",
        "synthetic",
    ])
    .unwrap_err();
    assert!(message(&e).contains("--amp needs a GPU"), "{}", message(&e));
    let e = convnets(&["train", "--arch", "resnet18", "--device", "cpu", "-o", o]).unwrap_err();
    assert!(message(&e).contains("--data"), "{}", message(&e));
    let e = convnets(&[
        "train",
        "--resume",
        "-o",
        tmp.path().join("none").to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(message(&e).contains("args.json"), "{}", message(&e));
    // Without GPUs (or NCCL), data parallelism and the GPU loader say why they cannot run.
    if !tch::Cuda::is_available() {
        let e = convnets(&[
            "train",
            "--arch",
            "resnet18",
            "--gpus",
            "2",
            "--loader",
            "synthetic",
            "-o",
            o,
        ])
        .unwrap_err();
        assert!(
            message(&e).contains("--gpus 2: 0 GPU(s) visible"),
            "{}",
            message(&e)
        );
        let e = convnets(&[
            "train", "--arch", "resnet18", "--loader", "gpu", "--data", o, "-o", o,
        ])
        .unwrap_err();
        assert!(message(&e).contains("GPU"), "{}", message(&e));
    }
    assert!(!out.exists(), "refused runs write nothing");
    Ok(())
}

#[test]
fn zero_init_residual_is_a_flag() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let packed = dataset(tmp.path(), 2, 8, 2)?;
    // The last BN of each residual branch (bn2 in resnet18's blocks): gamma 0 by default,
    // 1 (torchvision's init) with --zero-init-residual false; recorded in args.json.
    for (flag, gamma) in [(None, 0.0), (Some("false"), 1.0)] {
        let run = tmp
            .path()
            .join(format!("run-{}", flag.unwrap_or("default")));
        let mut extra = vec!["--max-steps", "0", "--eval-every", "0"];
        if let Some(v) = flag {
            extra.extend(["--zero-init-residual", v]);
        }
        convnets(&train_args(
            packed.to_str().unwrap(),
            run.to_str().unwrap(),
            &extra,
        ))?;
        let args: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("args.json"))?)?;
        assert_eq!(args["zero_init_residual"], flag.is_none());
        let ckpt = std::fs::read_dir(run.join("checkpoints"))?
            .next()
            .context("a checkpoint")??
            .path();
        let weights: std::collections::HashMap<String, tch::Tensor> =
            tch::Tensor::read_safetensors(ckpt.join("model.safetensors"))?
                .into_iter()
                .collect();
        for name in ["layer1.0.bn2.weight", "layer4.1.bn2.weight"] {
            let w = weights.get(name).context(name)?;
            assert_eq!(
                (w.min().double_value(&[]), w.max().double_value(&[])),
                (gamma, gamma),
                "{name}"
            );
        }
        assert_eq!(weights["layer1.0.bn1.weight"].min().double_value(&[]), 1.0);
    }
    Ok(())
}

#[test]
fn skipped_records_are_counted_and_listed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let records: Vec<_> = (0..6u32)
        .map(|i| match i {
            2 => (b"\xFF\xD8 not a jpeg at all".to_vec(), 0, 64, 48),
            _ => (baseline_jpeg(64, 48, u64::from(i)), i % 2, 64, 48),
        })
        .collect();
    one_shard_split(&data, &records, 2)?;
    let (d, run) = (data.to_str().unwrap(), tmp.path().join("run"));
    let base = [
        "train",
        "--data",
        d,
        "--arch",
        "resnet18",
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--batch-size",
        "3",
        "--threads",
        "2",
        "--epochs",
        "1",
        "--eval-every",
        "0",
        "--log-every",
        "1",
    ];
    // By default the bad record stops the run, named.
    let mut strict = base.to_vec();
    strict.extend(["-o", run.to_str().unwrap()]);
    expect_err(convnets(&strict), &["s-0.cnr", "record 2"])?;
    // With skip: the run goes on, and says how many it left out, and which.
    let run = tmp.path().join("run-skip");
    let mut lenient = base.to_vec();
    lenient.extend(["--on-bad-record", "skip", "-o", run.to_str().unwrap()]);
    convnets(&lenient)?;
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json"))?)?;
    assert_eq!(summary["skipped_records"], 1);
    assert_eq!(summary["skipped"][0]["record"], 2);
    assert!(summary["skipped"][0]["shard"]
        .as_str()
        .is_some_and(|s| s.ends_with("s-0.cnr")));
    let log = std::fs::read_to_string(run.join("log.jsonl"))?;
    let last: serde_json::Value = serde_json::from_str(
        log.lines()
            .rfind(|l| l.contains("\"type\":\"train\""))
            .context("a train line")?,
    )?;
    assert_eq!(last["skipped_records"], 1);
    Ok(())
}

#[test]
fn a_run_folder_in_use_is_refused_and_one_without_checkpoints_restarts() -> Result<()> {
    use std::os::fd::AsRawFd;
    let tmp = tempfile::tempdir()?;
    let packed = dataset(tmp.path(), 2, 8, 2)?;
    let run = tmp.path().join("run");
    let (p, r) = (packed.to_str().unwrap(), run.to_str().unwrap());
    convnets(&train_args(
        p,
        r,
        &["--epochs", "2", "--eval-every", "0", "--log-every", "1"],
    ))?;
    let steps = |run: &Path| -> Result<u64> {
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("summary.json"))?)?;
        summary["steps"].as_u64().context("steps")
    };
    let full = steps(&run)?;

    // Another process holds the folder: --resume (or a second run) is refused, naming it.
    let lock = std::fs::File::open(run.join(".lock"))?;
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let pid = std::fs::read_to_string(run.join(".lock"))?;
    expect_err(
        convnets(&["train", "--resume", "-o", r]),
        &["in use by another convnets train", &format!("PID {pid}")],
    )?;
    drop(lock);

    // A run killed before its first checkpoint: --resume starts it over, from a clean log.
    std::fs::remove_dir_all(run.join("checkpoints"))?;
    std::fs::create_dir_all(run.join("checkpoints/step-00000003.tmp"))?;
    std::fs::remove_file(run.join("summary.json"))?;
    convnets(&["train", "--resume", "-o", r])?;
    assert_eq!(steps(&run)?, full);
    let logged: Vec<u64> = train_losses(&run)?.into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        logged,
        (1..=full).collect::<Vec<_>>(),
        "one log line per step, none left from the first attempt"
    );
    assert!(!run.join("checkpoints/step-00000003.tmp").exists());
    Ok(())
}

#[test]
fn the_best_checkpoint_never_goes_stale() -> Result<()> {
    use convnets_tools::checkpoint;
    let tmp = tempfile::tempdir()?;
    let packed = dataset(tmp.path(), 3, 12, 3)?;
    let run = tmp.path().join("run");
    let (p, r) = (packed.to_str().unwrap(), run.to_str().unwrap());
    convnets(&train_args(
        p,
        r,
        &[
            "--epochs",
            "3",
            "--keep-last",
            "1",
            "--warmup-epochs",
            "0.5",
        ],
    ))?;
    let summary = |run: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(
            run.join("summary.json"),
        )?)?)
    };
    let first = summary(&run)?;
    let best_top1 = first["best_top1"].as_f64().context("best_top1")?;
    let best_dir = std::path::PathBuf::from(
        first["best_checkpoint"]
            .as_str()
            .context("best_checkpoint")?,
    );
    let root = run.join("checkpoints");
    let names = || -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(&root)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        names.sort();
        Ok(names)
    };
    let finished = names()?;

    // What a process killed while writing its last checkpoint could leave (with a full
    // disk too): `best` still naming another checkpoint than the latest state's best, a
    // partial temporary folder, and a checkpoint beyond --keep-last.
    let latest = checkpoint::latest_step(&root)?.context("a checkpoint")?;
    let extra = root.join("step-00000001");
    std::fs::create_dir(&extra)?;
    for entry in std::fs::read_dir(&latest)? {
        let entry = entry?;
        std::fs::copy(entry.path(), extra.join(entry.file_name()))?;
    }
    std::fs::remove_file(root.join("best"))?;
    std::os::unix::fs::symlink("step-00000001", root.join("best"))?;
    let partial = root.join("step-00000099.tmp");
    std::fs::create_dir(&partial)?;
    std::fs::write(partial.join("model.safetensors"), b"half a file")?;
    std::os::unix::fs::symlink("step-00000099", root.join("best.tmp"))?;

    // --resume of the finished run puts the folder back as a finished write leaves it.
    convnets(&["train", "--resume", "-o", r])?;
    assert_eq!(names()?, finished);
    let second = summary(&run)?;
    assert_eq!(second["best_top1"], first["best_top1"]);
    let resolved = checkpoint::resolve(&run)?;
    assert_eq!(resolved, best_dir);

    // eval --checkpoint RUN evaluates the weights of the summary's best top-1.
    let loaded = checkpoint::load(
        &resolved,
        tch::Device::Cpu,
        &convnets_models::ModelConfig::default(),
    )?;
    let val = convnets_tools::source::open_split(&packed, "val", 1)?;
    let mut cfg = convnets_pipeline::LoaderConfig::preset(
        convnets_pipeline::loader::Crops::Eval,
        16,
        32,
        convnets_pipeline::cpu::augment::OutputDtype::F32,
        convnets_pipeline::cpu::augment::Layout::Nchw,
    );
    cfg.threads = 2;
    let e = convnets_tools::train::evaluate(&loaded.model, val, cfg, tch::Device::Cpu, false)?;
    assert!(
        (e.top1 - best_top1).abs() < 1e-9,
        "best holds top-1 {} but the summary says {best_top1}",
        e.top1
    );
    Ok(())
}
