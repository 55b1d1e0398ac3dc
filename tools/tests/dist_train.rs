//! Data-parallel training between CPU processes (TCP collectives), end to end through the
//! binary: two ranks with half the batch each train like one process with the whole
//! batch, stay identical, evaluate every image once, and a run resumes with another
//! number of ranks. A rank that fails, and a run that diverges, stop every rank.

use std::path::Path;
use std::process::{Command, Output};

fn convnets(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_convnets"))
        .args(args)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .expect("run convnets");
    assert!(
        out.status.success(),
        "convnets {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn dataset(dir: &Path) -> String {
    let images = dir.join("synth");
    let packed = dir.join("packed");
    let (i, p) = (images.to_str().unwrap(), packed.to_str().unwrap());
    convnets(&[
        "synth",
        "--output",
        i,
        "--classes",
        "4",
        "--train-per-class",
        "32",
        "--val-per-class",
        "9",
        "--size",
        "40",
        "--seed",
        "3",
    ]);
    convnets(&["pack-imagenet", "-i", i, "-o", p, "-q"]);
    p.to_string()
}

fn train_args<'a>(data: &'a str, out: &'a str, batch: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--arch",
        "resnet18",
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--threads",
        "1",
        "--seed",
        "5",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--lr",
        "0.5",
        "--log-every",
        "1",
        "--eval-every",
        "1",
        "--batch-size",
        batch,
        "-o",
        out,
    ]
}

fn log(run: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == kind)
        .collect()
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap()
}

/// |loss a - loss b| per logged step.
fn loss_differences(a: &[serde_json::Value], b: &[serde_json::Value]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x["loss"].as_f64().unwrap() - y["loss"].as_f64().unwrap()).abs())
        .collect()
}

#[test]
fn two_ranks_train_like_one_process_with_the_whole_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    convnets(&train_args(&data, one.to_str().unwrap(), "16"));
    let mut args = vec!["launch", "--nproc", "2", "--"];
    args.extend(train_args(&data, two.to_str().unwrap(), "8"));
    convnets(&args);

    let s = summary(&two);
    assert_eq!(s["world_size"], 2);
    assert_eq!(
        s["weight_difference_across_ranks"], 0.0,
        "replicas drifted apart: {s}"
    );
    // Each rank evaluates its share; the sums cover every val image exactly once.
    assert_eq!(s["final_eval"]["images"], 36, "{s}");
    assert_eq!(summary(&one)["final_eval"]["images"], 36);

    // The same images per step (the sampler deals global batch k to the ranks), the same
    // start (rank 0's weights), the mean gradient: the losses follow the one-process run,
    // up to BN statistics over 8 instead of 16 images.
    let (a, b) = (log(&one, "train"), log(&two, "train"));
    assert_eq!(a.len(), 8);
    assert_eq!(a.len(), b.len());
    let diffs = loss_differences(&a, &b);
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    println!("per-step |loss(1 x 16) - loss(2 x 8)|: {diffs:.4?}, mean {mean:.4}");
    // Measured: 0.056 at the first step (same weights: BN alone), 0.073 on average.
    assert!(diffs[0] < 0.15, "first step: {}", diffs[0]);
    assert!(mean < 0.25, "mean difference {mean}");
    // Only rank 0 writes: one log, one set of checkpoints.
    assert!(two.join("checkpoints/best/model.safetensors").is_file());

    // Gradients sent as f16: the replicas still agree exactly (all take the same rounded
    // mean), and the run follows the f32 one up to the rounding.
    let half = tmp.path().join("half");
    let mut args = vec!["launch", "--nproc", "2", "--"];
    args.extend(train_args(&data, half.to_str().unwrap(), "8"));
    args.extend(["--allreduce-dtype", "f16"]);
    convnets(&args);
    assert_eq!(summary(&half)["weight_difference_across_ranks"], 0.0);
    let c = log(&half, "train");
    assert_eq!(c.len(), b.len());
    let diffs = loss_differences(&b, &c);
    println!("per-step |loss(f32 all-reduce) - loss(f16 all-reduce)|: {diffs:.4?}");
    assert!(
        diffs[0] == 0.0,
        "the first loss comes before any all-reduce: {}",
        diffs[0]
    );
    assert!(diffs.iter().all(|&d| d < 0.05), "{diffs:?}");
}

#[test]
fn a_run_resumes_with_another_number_of_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let mut args = vec!["launch", "--nproc", "2", "--"];
    args.extend(train_args(&data, r, "8"));
    args.extend(["--max-steps", "3"]);
    convnets(&args);
    // 2 ranks x 3 batches of 8 = 48 images into epoch 0: one process goes on at batch 6.
    let out = convnets(&["train", "--resume", "-o", r]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the run had 2 rank(s), now 1: continuing epoch 0 at batch 6"),
        "{err}"
    );
    let s = summary(&run);
    assert_eq!(s["world_size"], 1);
    // 3 steps on two ranks, then the rest of the epoch's 16 batches on one.
    assert_eq!(s["steps"], 3 + (16 - 6), "{s}");
}

#[test]
fn a_rank_that_fails_in_training_stops_the_others_and_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    // Damage one training record: its CRC check fails on whichever rank reads it.
    let shard = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("train")
        })
        .max_by_key(|p| p.metadata().unwrap().len())
        .expect("a train shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&shard, bytes).unwrap();

    let run = tmp.path().join("run");
    let mut args = vec!["launch", "--nproc", "2", "--"];
    args.extend(train_args(&data, run.to_str().unwrap(), "8"));
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_convnets"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "took {:?}: {err}",
        started.elapsed()
    );
    // The failing rank says which record; the launcher names that rank; the other rank
    // stops because of it instead of waiting in a collective.
    let name = shard.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&name), "{err}");
    let failed = (0..2)
        .find(|r| err.contains(&format!("error: rank {r} failed")))
        .expect(&err);
    let other = 1 - failed;
    assert!(
        err.contains(&format!("rank {other} stops: rank {failed} failed")),
        "{err}"
    );
}

#[test]
fn a_diverging_run_stops_every_rank_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let run = tmp.path().join("run");
    let mut args = vec!["launch", "--nproc", "2", "--"];
    args.extend(train_args(&data, run.to_str().unwrap(), "8"));
    // An LR that turns the weights to inf/NaN within a few steps, on both ranks alike (they
    // share the mean gradient and agree on the loss).
    let lr = args.iter().position(|a| *a == "--lr").unwrap() + 1;
    args[lr] = "1e12";
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_convnets"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "took {:?}: {err}",
        started.elapsed()
    );
    assert!(
        err.contains("for 5 steps in a row") && err.contains("the run diverged"),
        "{err}"
    );
    assert!(err.contains("no checkpoint was written before it"), "{err}");
    assert!(
        (0..2).any(|r| err.contains(&format!("error: rank {r} failed"))),
        "{err}"
    );
    // The log says when it happened: the non-finite losses of the last steps.
    let losses: Vec<_> = log(&run, "train")
        .iter()
        .map(|l| l["loss"].as_f64())
        .collect();
    assert!(
        losses.len() >= 5 && losses.iter().rev().take(5).all(Option::is_none),
        "{losses:?}"
    );
}
