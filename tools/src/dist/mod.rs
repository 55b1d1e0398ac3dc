//! Process groups for multi-GPU data-parallel training: which group this process is in
//! (`env`), how its ranks meet and watch each other (`rendezvous`), and a local launcher
//! (`launch`). Plain std and TCP, no GPU code; NCCL itself is in `nccl` (feature `cuda`).
//!
//! ```no_run
//! use std::time::Duration;
//! use convnets_tools::dist::{env::DistEnv, rendezvous::rendezvous};
//!
//! # fn main() -> anyhow::Result<()> {
//! if let Some(env) = DistEnv::from_env()? {
//!     // Rank 0 makes the payload (the NCCL unique id); every rank gets it.
//!     let (id, mut group) = rendezvous(&env, || Ok(vec![0u8; 128]), Duration::from_secs(300))?;
//!     group.watch(|message| {
//!         eprintln!("error: {message}");
//!         std::process::exit(convnets_tools::dist::PEER_FAILED_EXIT_STATUS);
//!     })?;
//!     // ... train, with `group.report_failure(reason)` before exiting on an error ...
//!     group.finish();
//! }
//! # Ok(())
//! # }
//! ```
//!
//! `convnets launch --nproc N -- COMMAND...` runs N ranks of a command on this machine;
//! `convnets dist-check` (hidden) exercises the rendezvous and the watchdog.

pub mod env;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;

use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use rand::RngCore;

use env::DistEnv;
use rendezvous::rendezvous;

/// The exit status of a rank that stops because another rank failed (what a watchdog's
/// `on_failure` should exit with). The launcher then names the rank that failed first, not
/// the ones that followed it.
pub const PEER_FAILED_EXIT_STATUS: i32 = 3;

/// `convnets launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Number of processes (ranks) to start on this machine.
    #[arg(long)]
    pub nproc: usize,
    /// GPUs for the ranks, one per rank, comma-separated: rank i gets
    /// CUDA_VISIBLE_DEVICES=<the i-th>. Without it every rank sees every GPU (and picks
    /// its own by LOCAL_RANK).
    #[arg(long, value_delimiter = ',')]
    pub gpus: Option<Vec<String>>,
    /// The convnets command (and its flags) each rank runs, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `convnets launch`: refuses to run inside a group (a launch within a launch).
pub fn launch_command(a: LaunchArgs) -> anyhow::Result<()> {
    if let Some(world) = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse::<usize>().ok())
        .filter(|&w| w > 1)
    {
        bail!("launch: WORLD_SIZE={world} is set, so this process already is a rank of a group (a launch inside a launch?)");
    }
    launch::launch(a.nproc, &a.command, a.gpus)
}

/// `convnets dist-check`: one rank of a process-group self-test (rendezvous, payload,
/// watchdog, orderly finish, simulated failures). Run it under `convnets launch`.
#[derive(Debug, Args)]
pub struct DistCheckArgs {
    /// Bytes of the random payload rank 0 makes and shares.
    #[arg(long, default_value_t = 128)]
    pub payload_size: usize,
    /// This rank fails after the rendezvous: it reports the failure, then exits with
    /// status 1 without finishing.
    #[arg(long)]
    pub fail_rank: Option<usize>,
    /// How long the failing rank runs before it fails, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub fail_after_ms: u64,
    /// This rank never joins, so that the rendezvous times out.
    #[arg(long)]
    pub hang_rank: Option<usize>,
    /// Rendezvous timeout in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_s: f64,
    /// How long ranks that do not fail stay in the group before finishing, in
    /// milliseconds [default: 300, or the timeout with --fail-rank, so they see it].
    #[arg(long)]
    pub wait_ms: Option<u64>,
    /// Also join an NCCL group (the payload is its id) and try sums on the GPU (this
    /// rank's GPU as training picks it); results in the JSON line.
    #[arg(long)]
    pub nccl: bool,
}

/// Runs one rank of the self-test: prints `{"rank", "world_size", "local_rank",
/// "payload_len", "payload_crc", "cuda_visible_devices"}` as one JSON line once the group
/// has met, and exits with
/// `PEER_FAILED_EXIT_STATUS` when another rank fails.
pub fn dist_check(a: DistCheckArgs) -> anyhow::Result<()> {
    let env = DistEnv::from_env()?.context(
        "dist-check needs a process group of 2 or more: run it under `convnets launch --nproc N --`, torchrun, srun or mpirun",
    )?;
    let timeout = Duration::try_from_secs_f64(a.timeout_s)
        .ok()
        .filter(|t| !t.is_zero())
        .with_context(|| {
            format!(
                "--timeout-s {}: not a positive number of seconds",
                a.timeout_s
            )
        })?;
    for (flag, rank) in [("--fail-rank", a.fail_rank), ("--hang-rank", a.hang_rank)] {
        if let Some(r) = rank.filter(|&r| r >= env.world_size) {
            bail!(
                "{flag} {r}: the group has ranks 0 to {}",
                env.world_size - 1
            );
        }
    }
    let rank = env.rank;
    if a.hang_rank == Some(rank) {
        // Alive but absent: the others' rendezvous times out naming this rank.
        std::thread::sleep(timeout * 2 + Duration::from_secs(10));
        bail!("rank {rank}: did not join the group (--hang-rank)");
    }

    let size = a.payload_size;
    let nccl = a.nccl;
    let make_payload = move || {
        if nccl {
            #[cfg(feature = "cuda")]
            return nccl::unique_id();
            #[cfg(not(feature = "cuda"))]
            bail!("--nccl needs a build with --features cuda");
        }
        let mut payload = vec![0u8; size];
        rand::thread_rng().fill_bytes(&mut payload);
        Ok(payload)
    };
    let (payload, mut group) = rendezvous(&env, make_payload, timeout)?;
    group.watch(move |message| {
        crate::say(&format!("error: rank {rank} stops: {message}"));
        std::process::exit(PEER_FAILED_EXIT_STATUS);
    })?;
    let line = serde_json::json!({
        "rank": rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "payload_len": payload.len(),
        "payload_crc": crc32c::crc32c(&payload),
        "cuda_visible_devices": std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        "nccl": if a.nccl { nccl_diagnostics(&env, &payload) } else { serde_json::Value::Null },
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    drop(stdout);

    if a.fail_rank == Some(rank) {
        std::thread::sleep(Duration::from_millis(a.fail_after_ms));
        group.report_failure("simulated failure (dist-check --fail-rank)");
        // No finish: the connections close as after a crash.
        bail!("rank {rank}: simulated failure (--fail-rank)");
    }
    let wait = match (a.wait_ms, a.fail_rank) {
        (Some(ms), _) => Duration::from_millis(ms),
        (None, Some(_)) => timeout,
        (None, None) => Duration::from_millis(300),
    };
    std::thread::sleep(wait);
    group.finish();
    Ok(())
}

/// Sums over the group on the GPU, three ways: a libtorch tensor on the legacy default
/// stream (what training does; also in f16 and bf16), the same on a separate stream, and a
/// driver allocation on the legacy stream. Each entry says "ok", a wrong value, or the NCCL error.
#[cfg(feature = "cuda")]
fn nccl_diagnostics(env: &DistEnv, id: &[u8]) -> serde_json::Value {
    use tch::{Device, Kind, Tensor};
    let device = env.device_index();
    let comm = match nccl::Nccl::new(device, env.rank, env.world_size, id) {
        Ok(c) => c,
        Err(e) => return serde_json::json!({ "init": format!("{e:#}") }),
    };
    let want = (env.world_size * (env.world_size + 1) / 2) as f64;
    let check = |t: &Tensor, r: anyhow::Result<()>| -> String {
        match r {
            Err(e) => format!("{e:#}"),
            Ok(()) => {
                let got = t
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Double)
                    .mean(Kind::Double)
                    .double_value(&[]);
                if (got - want).abs() < 1e-6 {
                    "ok".into()
                } else {
                    format!("sum {got}, expected {want}")
                }
            }
        }
    };
    let fresh_of = |kind| Tensor::full([1024], (env.rank + 1) as f64, (kind, Device::Cuda(device)));
    let fresh = || fresh_of(Kind::Float);
    let t = fresh();
    let torch_null = check(&t, comm.all_reduce_sum(&t));
    // The narrow types of --allreduce-dtype (small integer sums are exact in both).
    let [f16, bf16] = [Kind::Half, Kind::BFloat16].map(|kind| {
        let t = fresh_of(kind);
        check(&t, comm.all_reduce_sum(&t))
    });
    let t = fresh();
    tch::Cuda::synchronize(device as i64);
    let stream = cudarc::driver::CudaContext::new(device).and_then(|c| c.new_stream());
    let torch_stream = match &stream {
        Ok(s) => {
            let r = comm.all_reduce_raw(t.data_ptr() as u64, 1024, s.cu_stream() as u64);
            let _ = s.synchronize();
            check(&t, r)
        }
        Err(e) => format!("{e:?}"),
    };
    let t = fresh();
    // SAFETY: a fresh 4 KiB device allocation, freed below; the copies stay within it and
    // within `t` (1024 f32 = 4 KiB), after synchronising libtorch's work on `t`.
    let driver_null = match unsafe { cudarc::driver::result::malloc_sync(4096) } {
        Ok(p) => {
            tch::Cuda::synchronize(device as i64);
            let r =
                unsafe { cudarc::driver::result::memcpy_dtod_sync(p, t.data_ptr() as u64, 4096) }
                    .map_err(|e| anyhow::anyhow!("{e:?}"))
                    .and_then(|()| comm.all_reduce_raw(p, 1024, 0))
                    .and_then(|()| {
                        unsafe {
                            cudarc::driver::result::memcpy_dtod_sync(t.data_ptr() as u64, p, 4096)
                        }
                        .map_err(|e| anyhow::anyhow!("{e:?}"))
                    });
            // SAFETY: `p` came from malloc_sync above and nothing uses it any more (the
            // copies were synchronous).
            let _ = unsafe { cudarc::driver::result::free_sync(p) };
            check(&t, r)
        }
        Err(e) => format!("{e:?}"),
    };
    serde_json::json!({ "device": device, "torch_tensor_default_stream": torch_null,
        "torch_tensor_f16": f16, "torch_tensor_bf16": bf16,
        "torch_tensor_own_stream": torch_stream, "driver_buffer_default_stream": driver_null })
}

#[cfg(not(feature = "cuda"))]
fn nccl_diagnostics(_env: &DistEnv, _id: &[u8]) -> serde_json::Value {
    serde_json::json!("built without CUDA")
}
