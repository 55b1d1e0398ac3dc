//! One rank of a data-parallel run: the rendezvous (TCP, from the launcher's or
//! torchrun's environment), then the collectives the trainer needs: NCCL on this rank's
//! GPU, or, for processes training on CPUs, sums through rank 0 over TCP. Gradients are
//! summed in the optimizer's flat buffer (one bucket, fp32, or a f16/bf16 copy of it with
//! `--allreduce-dtype`) on libtorch's stream; BN statistics stay per replica, as in the
//! seed.

use std::time::Duration;

use anyhow::bail;
use tch::{Device, Kind, Tensor};

use crate::dist::env::DistEnv;
use crate::dist::rendezvous::{rendezvous, Group};
use crate::dist::tcp::{Listener, TcpCollectives};

/// How long ranks wait for each other to start (`CONVNETS_RENDEZVOUS_TIMEOUT_S`).
fn rendezvous_timeout() -> Duration {
    let s = std::env::var("CONVNETS_RENDEZVOUS_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300.0);
    Duration::from_secs_f64(s)
}

pub struct Distributed {
    pub rank: usize,
    pub world_size: usize,
    /// The group's processes on this machine, when the launcher says.
    pub local_world_size: Option<usize>,
    /// CUDA device index of this rank; `None` for a group of CPU processes.
    pub device: Option<usize>,
    group: Option<Group>,
    backend: Collectives,
    stall: Option<StallWatch>,
}

/// NCCL between GPUs; TCP through rank 0 between CPU processes.
enum Collectives {
    #[cfg(feature = "cuda")]
    Nccl(std::sync::Arc<crate::dist::nccl::Nccl>),
    Tcp(std::sync::Mutex<TcpCollectives>),
}

/// What a watchdog does when another rank fails: say so, and end this process without
/// waiting on anything (a collective in flight may never finish).
fn exit_naming(rank: usize, msg: &str) -> ! {
    crate::say(&format!("error: rank {rank} stops: {msg}"));
    // Not `exit`: its handlers could wait on the GPU, which may never finish.
    // SAFETY: ends the process.
    unsafe { libc::_exit(crate::dist::PEER_FAILED_EXIT_STATUS) }
}

/// A rank that made no progress for too long: say so, abort the collectives, and end the
/// process; the others' watchdogs then stop them, naming this rank.
fn stalled(rank: usize, since: Duration, abort: impl FnOnce()) {
    crate::say(&format!(
        "error: rank {rank}: no training step finished for {:.0} s: a collective never completed \
         (ranks out of step, or a hung GPU; CONVNETS_COLLECTIVE_TIMEOUT_S sets the limit)",
        since.as_secs_f64()
    ));
    abort();
    // SAFETY: ends the process.
    unsafe { libc::_exit(1) }
}

impl Distributed {
    /// Meets the other ranks and joins the group's collectives: NCCL on this rank's GPU
    /// when `gpu`, else TCP. From here on, a rank that dies or reports a failure makes
    /// every other rank exit with a message naming it.
    pub fn start(env: &DistEnv, gpu: bool) -> anyhow::Result<Self> {
        let rank = env.rank;
        let timeout = rendezvous_timeout();
        if gpu {
            return Self::start_nccl(env, timeout);
        }
        let listener = if rank == 0 {
            Some(Listener::bind(env)?)
        } else {
            None
        };
        let port = listener
            .as_ref()
            .map(Listener::port)
            .transpose()?
            .unwrap_or(0);
        let (payload, mut group) =
            rendezvous(env, move || Ok(port.to_le_bytes().to_vec()), timeout)?;
        let port = match payload.as_slice() {
            [a, b] => u16::from_le_bytes([*a, *b]),
            _ => bail!(
                "rendezvous payload of {} bytes, expected a port",
                payload.len()
            ),
        };
        let tcp = TcpCollectives::connect(env, listener, port, timeout)?;
        group.watch(move |msg| exit_naming(rank, msg))?;
        let stall = StallWatch::start(stall_timeout(), move |since| stalled(rank, since, || {}));
        Ok(Self {
            rank,
            world_size: env.world_size,
            local_world_size: env.local_world_size,
            device: None,
            group: Some(group),
            backend: Collectives::Tcp(std::sync::Mutex::new(tcp)),
            stall: Some(stall),
        })
    }

    #[cfg(feature = "cuda")]
    fn start_nccl(env: &DistEnv, timeout: Duration) -> anyhow::Result<Self> {
        use crate::dist::nccl::{unique_id, Nccl};
        let device = env.device_index();
        let (id, mut group) = rendezvous(env, unique_id, timeout)?;
        let nccl = std::sync::Arc::new(Nccl::new(device, env.rank, env.world_size, &id)?);
        let rank = env.rank;
        let on_failure = {
            let nccl = nccl.clone();
            move |msg: &str| {
                nccl.abort();
                exit_naming(rank, msg)
            }
        };
        group.watch(on_failure)?;
        let stall = {
            let nccl = nccl.clone();
            StallWatch::start(stall_timeout(), move |since| {
                stalled(rank, since, move || nccl.abort())
            })
        };
        Ok(Self {
            rank,
            world_size: env.world_size,
            local_world_size: env.local_world_size,
            device: Some(device),
            group: Some(group),
            backend: Collectives::Nccl(nccl),
            stall: Some(stall),
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn start_nccl(_env: &DistEnv, _timeout: Duration) -> anyhow::Result<Self> {
        bail!("multi-GPU training needs NCCL: build with `--features cuda`")
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// A training step (or an evaluation) finished: the group is not stuck.
    pub fn progress(&self) {
        if let Some(s) = &self.stall {
            s.progress();
        }
    }

    /// Sums `t` over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> anyhow::Result<()> {
        match &self.backend {
            #[cfg(feature = "cuda")]
            Collectives::Nccl(n) => n.all_reduce_sum(t),
            Collectives::Tcp(c) => c
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .all_reduce_sum(t),
        }
    }

    /// Averages `t` over the ranks, in place.
    pub fn all_reduce_mean(&self, t: &Tensor) -> anyhow::Result<()> {
        self.all_reduce_sum(t)?;
        let _guard = tch::no_grad_guard();
        let mut t = t.shallow_clone();
        let _ = t.f_mul_scalar_(1.0 / self.world_size as f64)?;
        Ok(())
    }

    /// Averages `t` over the ranks, in place, sending it as `kind` (a narrower float type
    /// halves the traffic). Each rank divides before the sum so that fp16 stays in range.
    pub fn all_reduce_mean_in(&self, t: &Tensor, kind: Kind) -> anyhow::Result<()> {
        if kind == t.kind() {
            return self.all_reduce_mean(t);
        }
        let _guard = tch::no_grad_guard();
        let wire = t
            .f_mul_scalar(1.0 / self.world_size as f64)?
            .f_to_kind(kind)?;
        self.all_reduce_sum(&wire)?;
        let mut t = t.shallow_clone();
        t.f_copy_(&wire)?;
        Ok(())
    }

    /// Copies rank 0's `t` to every rank, in place.
    pub fn broadcast_from_main(&self, t: &Tensor) -> anyhow::Result<()> {
        match &self.backend {
            #[cfg(feature = "cuda")]
            Collectives::Nccl(n) => n.broadcast(t, 0),
            Collectives::Tcp(c) => c.lock().unwrap_or_else(|p| p.into_inner()).broadcast(t),
        }
    }

    /// Sums a few numbers over the ranks (one small collective, then a host copy).
    pub fn sum_values(&self, values: &[f64]) -> anyhow::Result<Vec<f64>> {
        let device = self.device.map_or(Device::Cpu, Device::Cuda);
        let t = Tensor::from_slice(values).to_device(device);
        self.all_reduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(
            t.to_device(Device::Cpu).to_kind(Kind::Double),
        )?)
    }

    /// Tells the other ranks why this one stops (they exit naming it).
    pub fn report_failure(&self, reason: &str) {
        if let Some(g) = &self.group {
            g.report_failure(reason);
        }
    }

    /// The orderly end: the other ranks do not take the closed connections as a failure.
    pub fn finish(mut self) {
        self.stall.take();
        if let Some(g) = self.group.take() {
            g.finish();
        }
    }
}

/// Notices a rank that stopped making progress: a collective that never completes (ranks
/// out of step, a hung GPU) would otherwise wait forever, as nothing died. The trainer
/// calls `progress` when set-up is done and after every step; after `timeout` without
/// one, `on_stall` runs once (like PyTorch's NCCL timeout, 10 minutes by default:
/// `CONVNETS_COLLECTIVE_TIMEOUT_S`). Set-up (opening a large TFRecord folder can take
/// minutes) is not timed: the watch is armed by the first `progress`.
pub struct StallWatch {
    last: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StallWatch {
    pub fn start(timeout: Duration, on_stall: impl FnOnce(Duration) + Send + 'static) -> Self {
        use std::sync::atomic::Ordering;
        let last = std::sync::Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l, s) = (last.clone(), stop.clone());
        let tick = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                let since = l
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .map(|t| t.elapsed());
                if let Some(since) = since.filter(|&d| d > timeout) {
                    if !s.load(Ordering::Relaxed) {
                        on_stall(since);
                    }
                    return;
                }
            }
        });
        Self { last, stop }
    }

    pub fn progress(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }
}

impl Drop for StallWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `CONVNETS_COLLECTIVE_TIMEOUT_S`, 600 s by default.
pub fn stall_timeout() -> Duration {
    let s = std::env::var("CONVNETS_COLLECTIVE_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(600.0);
    Duration::from_secs_f64(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_stall_is_reported_once_and_progress_keeps_it_away() {
        let (tx, rx) = mpsc::channel();
        let watch = StallWatch::start(Duration::from_millis(150), move |since| {
            tx.send(since).unwrap()
        });
        // Not armed before the first progress (set-up is not timed).
        std::thread::sleep(Duration::from_millis(400));
        assert!(rx.try_recv().is_err(), "set-up is not timed");
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(50));
            watch.progress();
        }
        assert!(rx.try_recv().is_err(), "no stall while progressing");
        let since = rx.recv_timeout(Duration::from_secs(5)).expect("a stall");
        assert!(since >= Duration::from_millis(150));
        drop(watch);
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "reported once"
        );
    }

    #[test]
    fn a_stopped_watch_reports_nothing() {
        let (tx, rx) = mpsc::channel();
        let watch = StallWatch::start(Duration::from_millis(50), move |since| {
            tx.send(since).unwrap()
        });
        watch.progress();
        drop(watch);
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    }
}
