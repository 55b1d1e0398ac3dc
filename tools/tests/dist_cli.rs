//! Process groups run as a user would: `convnets launch` of the hidden `dist-check`
//! command, and ranks started by hand with torchrun's variables. Every rank is a real
//! process, so deaths, timeouts and signals are the real ones.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// What a rank's watchdog exits with when another rank failed.
const PEER_FAILED: i32 = convnets_tools::dist::PEER_FAILED_EXIT_STATUS;

fn convnets() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_convnets"));
    // A group around the test itself (CI under srun, say) must not leak into the ranks.
    for var in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ] {
        command.env_remove(var);
    }
    command.stdin(Stdio::null());
    command
}

/// `convnets ARGS`, with how long it took.
fn run(args: &[&str]) -> Result<(Output, Duration)> {
    let start = Instant::now();
    let output = convnets().args(args).output()?;
    Ok((output, start.elapsed()))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The JSON lines of `dist-check` ranks, sorted by rank.
fn rank_lines(stdout: &[u8]) -> Result<Vec<Value>> {
    let mut lines: Vec<Value> = String::from_utf8(stdout.to_vec())?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    lines.sort_by_key(|l| l["rank"].as_u64());
    Ok(lines)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Ranks started by hand; killed when the test ends, however it ends.
struct Ranks(Vec<Child>);

impl Ranks {
    /// `convnets dist-check ARGS` as ranks `0..world` of a torchrun-style group.
    fn start(world: usize, args: &[&str]) -> Result<Ranks> {
        let port = free_port()?.to_string();
        let mut ranks = Ranks(Vec::new());
        for rank in 0..world {
            let child = convnets()
                .arg("dist-check")
                .args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            ranks.0.push(child);
        }
        Ok(ranks)
    }

    /// Waits for rank `rank` to exit, for at most `limit`; its status and stderr.
    fn wait(&mut self, rank: usize, limit: Duration) -> Result<(ExitStatus, String)> {
        let child = &mut self.0[rank];
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("rank {rank} still runs after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .context("stderr")?
            .read_to_string(&mut err)?;
        Ok((status, err))
    }

    /// The first stdout line of every rank (its JSON line: the group has met).
    fn first_lines(&mut self, limit: Duration) -> Result<Vec<Value>> {
        let (tx, rx) = mpsc::channel();
        for (rank, child) in self.0.iter_mut().enumerate() {
            let stdout = child.stdout.take().context("stdout")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send((rank, line));
            });
        }
        let deadline = Instant::now() + limit;
        let mut lines = vec![Value::Null; self.0.len()];
        for _ in 0..self.0.len() {
            let (rank, line) = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .context("not every rank printed its line in time")?;
            lines[rank] = serde_json::from_str(&line)
                .with_context(|| format!("rank {rank} printed {line:?}"))?;
        }
        Ok(lines)
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn launched_ranks_share_rank_zeros_payload() -> Result<()> {
    let (out, took) = run(&[
        "launch",
        "--nproc",
        "3",
        "--gpus",
        "4,5,6",
        "--",
        "dist-check",
        "--payload-size",
        "200",
    ])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = rank_lines(&out.stdout)?;
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (rank, line) in lines.iter().enumerate() {
        assert_eq!(line["rank"], rank, "{line}");
        assert_eq!(line["local_rank"], rank, "{line}");
        assert_eq!(line["world_size"], 3, "{line}");
        assert_eq!(line["payload_len"], 200, "{line}");
        assert_eq!(line["payload_crc"], lines[0]["payload_crc"], "{lines:?}");
        assert_eq!(
            line["cuda_visible_devices"],
            (rank + 4).to_string(),
            "{line}"
        );
    }
    assert!(took < Duration::from_secs(20), "took {took:?}");

    // Without --gpus the launcher leaves CUDA_VISIBLE_DEVICES alone.
    let out = convnets()
        .args(["launch", "--nproc", "2", "--", "dist-check"])
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = rank_lines(&out.stdout)?;
    assert_eq!(lines.len(), 2);
    assert!(
        lines.iter().all(|l| l["cuda_visible_devices"].is_null()),
        "{lines:?}"
    );
    Ok(())
}

#[test]
fn a_failing_rank_stops_the_launch_and_is_named() -> Result<()> {
    let (out, took) = run(&[
        "launch",
        "--nproc",
        "3",
        "--",
        "dist-check",
        "--fail-rank",
        "1",
        "--fail-after-ms",
        "300",
    ])?;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}: {err}");
    // The launcher names the rank that failed, not the ranks its failure stopped.
    assert!(
        err.contains("error: rank 1 failed (exit status 1); stopped the other ranks"),
        "{err}"
    );
    for survivor in [0, 2] {
        let said = format!("rank {survivor} stops: rank 1 failed: simulated failure");
        assert!(err.contains(&said), "{err}");
    }
    assert_eq!(
        rank_lines(&out.stdout)?.len(),
        3,
        "every rank met before the failure"
    );
    Ok(())
}

#[test]
fn a_rank_that_never_comes_is_named_by_rank_zero() -> Result<()> {
    let mut ranks = Ranks::start(2, &["--hang-rank", "1", "--timeout-s", "2"])?;
    let (status, err) = ranks.wait(0, Duration::from_secs(15))?;
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("ranks [1] did not connect within 2 s"),
        "{err}"
    );
    Ok(())
}

#[test]
fn the_watchdog_names_a_killed_rank_to_the_others() -> Result<()> {
    let mut ranks = Ranks::start(3, &["--wait-ms", "20000"])?;
    let lines = ranks.first_lines(Duration::from_secs(20))?;
    assert!(
        lines
            .iter()
            .all(|l| l["payload_crc"] == lines[0]["payload_crc"]),
        "{lines:?}"
    );
    ranks.0[2].kill()?; // SIGKILL: no goodbye on the control channel
    for rank in [0, 1] {
        let (status, err) = ranks.wait(rank, Duration::from_secs(10))?;
        assert_eq!(status.code(), Some(PEER_FAILED), "rank {rank}: {err}");
        assert!(
            err.contains(&format!(
                "rank {rank} stops: rank 2 exited or lost its connection"
            )),
            "{err}"
        );
    }
    Ok(())
}

#[test]
fn usage_errors_are_clear() -> Result<()> {
    let cases: &[(&[&str], &str)] = &[
        (
            &["launch", "--nproc", "2", "--gpus", "0", "--", "dist-check"],
            "1 GPU(s) (0) for 2 ranks",
        ),
        (
            &["launch", "--nproc", "0", "--", "dist-check"],
            "at least 1",
        ),
        (&["launch", "--nproc", "2"], "COMMAND"),
        (&["dist-check"], "dist-check needs a process group"),
    ];
    for (args, expected) in cases {
        let (out, _) = run(args)?;
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = convnets()
        .args(["launch", "--nproc", "2", "--", "dist-check"])
        .env("WORLD_SIZE", "4")
        .output()?;
    assert!(
        stderr(&out).contains("already is a rank of a group"),
        "{}",
        stderr(&out)
    );
    // The launcher's documentation, visible; the self-test, hidden.
    let help = String::from_utf8(run(&["--help"])?.0.stdout)?;
    assert!(
        help.contains("launch") && !help.contains("dist-check"),
        "{help}"
    );
    Ok(())
}
