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
