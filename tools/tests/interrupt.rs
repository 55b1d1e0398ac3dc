//! Ctrl-C on `convnets train` (one process): it saves a checkpoint, says where, and exits
//! with 130 (the shell's code for SIGINT); `--resume` goes on from there.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

#[test]
fn ctrl_c_saves_says_so_and_exits_130() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run = tmp.path().join("run");
    let r = run.to_str().context("utf-8 path")?;
    let bin = env!("CARGO_BIN_EXE_convnets");
    let args = [
        "train",
        "--loader",
        "synthetic",
        "--device",
        "cpu",
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--epochs",
        "50",
        "--eval-every",
        "0",
        "--log-every",
        "1",
        "--threads",
        "1",
        "-o",
        r,
    ];
    let child = Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // Wait until it trains (log lines appear), then interrupt it.
    let start = Instant::now();
    while std::fs::read_to_string(run.join("log.jsonl")).map_or(0, |l| l.lines().count()) < 3 {
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "no training steps after 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling a child this test started.
    ensure!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) } == 0,
        "kill -INT"
    );
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted at step") && err.contains("saved, continue with --resume"),
        "{err}"
    );
    assert!(
        err.contains("checkpoints/step-"),
        "the checkpoint is named: {err}"
    );

    // --resume goes on from the saved step.
    let out = Command::new(bin)
        .args(["train", "--resume", "-o", r, "--max-steps", "200"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    Ok(())
}
