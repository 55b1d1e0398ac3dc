//! The `convnets` command line: bad flags and inputs give clear errors (never panics),
//! with the right exit codes; `devices` in a CPU build says it was built without CUDA.

mod common;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use common::*;

/// A tiny valid input folder, so flag errors are not masked by input errors.
fn input(tmp: &Path) -> Result<ImageNetFixture> {
    let spec = ImageNetSpec {
        classes: 2,
        train_per_class: 2,
        val_per_class: 1,
        ..Default::default()
    };
    make_imagenet(&tmp.join("imagenet"), &spec)
}

/// Runs `pack-imagenet -i <input> -o <out> <args>` and expects an error mentioning
/// every needle; nothing may be written to `out`.
fn pack_fails(
    fixture: &ImageNetFixture,
    out: &Path,
    args: &[&str],
    needles: &[&str],
) -> Result<String> {
    let msg = expect_err(pack(&fixture.root, out, args), needles)?;
    assert!(
        !out.join("manifest.json").exists(),
        "{args:?} wrote a dataset"
    );
    Ok(msg)
}

#[test]
fn bad_pack_flags_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = input(tmp.path())?;
    let out = tmp.path().join("out");
    pack_fails(&fixture, &out, &["--quality", "0"], &["--quality", "0"])?;
    pack_fails(&fixture, &out, &["--quality", "101"], &["--quality", "101"])?;
    pack_fails(
        &fixture,
        &out,
        &["--quality", "high"],
        &["--quality", "high"],
    )?;
    pack_fails(
        &fixture,
        &out,
        &["--shard-size", "12parsecs"],
        &["--shard-size", "12parsecs", "parsecs"],
    )?;
    pack_fails(&fixture, &out, &["--shard-size", "0"], &["--shard-size"])?;
    pack_fails(&fixture, &out, &["--shard-size", ""], &["--shard-size"])?;
    pack_fails(&fixture, &out, &["--train-shards", "3"], &["--val-shards"])?;
    pack_fails(
        &fixture,
        &out,
        &[
            "--train-shards",
            "3",
            "--val-shards",
            "1",
            "--shard-size",
            "1M",
        ],
        &["--shard-size"],
    )?;
    pack_fails(
        &fixture,
        &out,
        &["--train-shards", "0", "--val-shards", "1"],
        &["--train-shards", "at least 1"],
    )?;
    pack_fails(
        &fixture,
        &out,
        &["--train-shards", "-2", "--val-shards", "1"],
        &["-2"],
    )?;
    pack_fails(&fixture, &out, &["--max-side", "0"], &["--max-side"])?;
    pack_fails(
        &fixture,
        &out,
        &["--awkward", "keep"],
        &["--awkward", "keep"],
    )?;
    pack_fails(&fixture, &out, &["--format", "zip"], &["--format", "zip"])?;
    pack_fails(&fixture, &out, &["--seed", "-1"], &["-1"])?;
    pack_fails(&fixture, &out, &["--bogus-flag"], &["--bogus-flag"])?;
    Ok(())
}

#[test]
fn bad_pack_inputs_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("out");
    let missing = tmp.path().join("no-such-input");
    expect_err(pack(&missing, &out, &[]), &["no-such-input"])?;
    assert!(!out.join("manifest.json").exists());

    // A folder that is not ImageNet-shaped.
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(odd.join("pictures"))?;
    expect_err(pack(&odd, &tmp.path().join("out2"), &[]), &["odd", "train"])?;

    // A flat val/ whose labels name a class that train/ lacks.
    let fixture = input(&tmp.path().join("x"))?;
    let csv = fixture.root.join("LOC_val_solution.csv");
    let text = std::fs::read_to_string(&csv)?.replacen(&fixture.wnids[0], "n09999999", 1);
    std::fs::write(&csv, text)?;
    expect_err(
        pack(&fixture.root, &tmp.path().join("out3"), &[]),
        &["n09999999"],
    )?;

    // Output path is a file.
    let fixture = input(&tmp.path().join("y"))?;
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x")?;
    expect_err(pack(&fixture.root, &file, &[]), &["a-file"])?;
    Ok(())
}

#[test]
fn usage_errors_and_exit_codes() -> Result<()> {
    // Missing arguments and unknown commands are errors, not panics.
    expect_err(convnets::<&str>(&[]), &[])?;
    expect_err(convnets(&["frobnicate"]), &["frobnicate"])?;
    expect_err(convnets(&["pack-imagenet"]), &["--input"])?;
    expect_err(convnets(&["verify"]), &["DATASET"])?;
    // Exit codes: usage errors 2 (clap's), failures 1, --version 0. (`--help` would be
    // the same as --version, but prints pages into the test output.)
    assert_eq!(
        convnets_tools::main_with([
            "convnets",
            "pack-imagenet",
            "-i",
            "x",
            "-o",
            "y",
            "--quality",
            "0"
        ]),
        ExitCode::from(2)
    );
    assert_eq!(
        convnets_tools::main_with(["convnets", "verify", "/nonexistent/dataset"]),
        ExitCode::FAILURE
    );
    assert_eq!(
        convnets_tools::main_with(["convnets", "--version"]),
        ExitCode::SUCCESS
    );
    Ok(())
}

#[cfg(not(feature = "cuda"))]
#[test]
fn devices_in_a_cpu_build_says_built_without_cuda() -> Result<()> {
    expect_err(convnets(&["devices"]), &["built without CUDA"])?;
    expect_err(convnets(&["devices", "--json"]), &["built without CUDA"])?;
    assert_eq!(
        convnets_tools::main_with(["convnets", "devices"]),
        ExitCode::FAILURE
    );
    Ok(())
}

#[test]
fn bad_training_values_are_refused_before_anything_is_written() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--lr", "nan"], &["--lr", "NaN"]),
        (&["--lr=-1"], &["--lr", "> 0", "-1"]),
        (&["--lr", "0"], &["--lr"]),
        (&["--lr", "inf"], &["--lr", "inf"]),
        (&["--momentum=-0.5"], &["--momentum", ">= 0"]),
        (&["--weight-decay=-1e-4"], &["--weight-decay", ">= 0"]),
        (
            &["--label-smoothing", "1.5"],
            &["--label-smoothing", "between 0 and 1"],
        ),
        (&["--mixup", "nan"], &["--mixup"]),
        (&["--ema", "1"], &["--ema"]),
        (&["--warmup-epochs=-2"], &["--warmup-epochs", ">= 0"]),
        (
            &["--lr-schedule", "step", "--lr-steps", "30,nan"],
            &["--lr-steps"],
        ),
        (
            &["--nesterov", "--momentum", "0"],
            &["--nesterov", "--momentum"],
        ),
        (&["--threads", "100000"], &["--threads 100000", "per core"]),
    ];
    for (flags, needles) in cases {
        let mut args = vec![
            "train",
            "--loader",
            "synthetic",
            "--device",
            "cpu",
            "--arch",
            "resnet18",
            "-o",
            r,
        ];
        args.extend_from_slice(flags);
        expect_err(convnets(&args), needles)?;
        assert!(!run.join("args.json").exists(), "{flags:?} started a run");
    }
    // The loader and predict refuse an absurd thread count too, instead of aborting.
    expect_err(
        convnets(&[
            "predict",
            "--checkpoint",
            r,
            "--device",
            "cpu",
            "--threads",
            "100000",
            r,
        ]),
        &["--threads 100000"],
    )?;
    Ok(())
}

/// Set in a child process of this test binary: the arguments (JSON) `child_convnets` runs.
const CHILD_ARGS: &str = "CONVNETS_TEST_CHILD_ARGS";

/// Not a test on its own: in a child process started by [`convnets_process`], runs
/// `convnets` with the arguments in `CHILD_ARGS` and exits with its exit code.
#[test]
fn child_convnets() {
    let Ok(json) = std::env::var(CHILD_ARGS) else {
        return;
    };
    let args: Vec<String> = serde_json::from_str(&json).expect("arguments as a JSON list");
    let code = convnets_tools::main_with(std::iter::once("convnets".to_string()).chain(args));
    let status = (0..=u8::MAX)
        .find(|&n| code == ExitCode::from(n))
        .unwrap_or(u8::MAX);
    std::process::exit(i32::from(status));
}

/// Runs `convnets args...` in a process of its own (this test binary, re-entered at
/// `child_convnets`), so that an abort or a panic shows as it would to a user; Rust
/// backtraces are on, so a panic would be plain in its stderr.
fn convnets_process(args: &[&str]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(std::env::current_exe()?)
        .args([
            "child_convnets",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ARGS, serde_json::to_string(args)?)
        .env("RUST_BACKTRACE", "1")
        .output()?)
}

#[test]
fn sizes_that_cannot_be_allocated_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // A checkpoint for predict: resnet18 with 2 classes, weights as initialised.
    let checkpoint = tmp.path().join("checkpoint");
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let arch = convnets_models::Arch::ResNet18;
    arch.build(&vs.root(), 2, &convnets_models::ModelConfig::default())?;
    convnets_tools::checkpoint::save(
        &checkpoint,
        &vs,
        &convnets_tools::checkpoint::CheckpointMeta::new(arch, 2),
    )?;
    let image = tmp.path().join("image.jpg");
    std::fs::write(&image, baseline_jpeg(64, 48, 1))?;
    let run = tmp.path().join("run");
    let (c, i, r) = (
        checkpoint.to_str().unwrap(),
        image.to_str().unwrap(),
        run.to_str().unwrap(),
    );
    let train = [
        "train",
        "--loader",
        "synthetic",
        "--device",
        "cpu",
        "--arch",
    ];
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[
                &train[..],
                &["resnet18", "--batch-size", "100000000", "-o", r],
            ]
            .concat(),
            &["--batch-size 100000000", "TiB", "this machine"],
        ),
        (
            &[&train[..], &["resnet18", "--image-size", "100000", "-o", r]].concat(),
            &["--batch-size 256", "--image-size 100000", "TiB"],
        ),
        (
            &[
                "predict",
                "--checkpoint",
                c,
                "--device",
                "cpu",
                "--image-size",
                "100000",
                i,
            ],
            &[
                "--batch-size 1",
                "--image-size 100000",
                "GiB",
                "this machine",
            ],
        ),
    ];
    for (args, needles) in cases {
        let out = convnets_process(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        assert!(
            matches!(code, Some(1 | 2)),
            "{args:?}: exit {:?} ({}), stderr:\n{stderr}",
            code,
            out.status
        );
        for needle in *needles {
            assert!(
                stderr.contains(needle),
                "{args:?}: no {needle:?} in:\n{stderr}"
            );
        }
        for bad in ["panicked", "backtrace", "frame #"] {
            assert!(!stderr.contains(bad), "{args:?}: {bad:?} in:\n{stderr}");
        }
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("IMAGE"),
            "{args:?} printed results"
        );
        assert!(!run.exists(), "{args:?} wrote a run folder");
    }
    Ok(())
}
