//! One rank of a data-parallel run: the rendezvous (TCP, from the launcher's or
//! torchrun's environment), an NCCL communicator on this rank's GPU, and the collectives
//! the trainer needs. Gradients are summed in place in the optimizer's flat buffer (one
//! bucket, fp32) on libtorch's stream; BN statistics stay per GPU, as in the seed.

use std::time::Duration;

#[cfg(not(feature = "cuda"))]
use anyhow::bail;
use tch::{Device, Kind, Tensor};

use crate::dist::env::DistEnv;

/// How long ranks wait for each other to start (`CONVNETS_RENDEZVOUS_TIMEOUT_S`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn rendezvous_timeout() -> Duration {
    let s = std::env::var("CONVNETS_RENDEZVOUS_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300.0);
    Duration::from_secs_f64(s)
}

/// The GPU this rank uses: the only visible one when the launcher restricted
/// `CUDA_VISIBLE_DEVICES` to it, else the one at `LOCAL_RANK` (torchrun's convention).
pub fn device_index(env: &DistEnv) -> usize {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if v.split(',').filter(|s| !s.trim().is_empty()).count() == 1 => 0,
        _ => env.local_rank,
    }
}

pub struct Distributed {
    pub rank: usize,
    pub world_size: usize,
    /// CUDA device index of this rank.
    pub device: usize,
    group: Option<crate::dist::rendezvous::Group>,
    #[cfg(feature = "cuda")]
    nccl: std::sync::Arc<crate::dist::nccl::Nccl>,
}

impl Distributed {
    /// Meets the other ranks and joins the NCCL group. From here on, a rank that dies or
    /// reports a failure makes every other rank exit with a message naming it.
    #[cfg(feature = "cuda")]
    pub fn start(env: &DistEnv) -> anyhow::Result<Self> {
        use crate::dist::nccl::{unique_id, Nccl};
        use crate::dist::rendezvous::rendezvous;
        let device = device_index(env);
        let (id, mut group) = rendezvous(env, unique_id, rendezvous_timeout())?;
        let nccl = std::sync::Arc::new(Nccl::new(device, env.rank, env.world_size, &id)?);
        let on_failure = {
            let nccl = nccl.clone();
            let rank = env.rank;
            move |msg: &str| {
                eprintln!("error: rank {rank} stops: {msg}");
                nccl.abort();
                // Not `exit`: its handlers could wait on the GPU, which may never finish.
                // SAFETY: ends the process.
                unsafe { libc::_exit(crate::dist::PEER_FAILED_EXIT_STATUS) };
            }
        };
        group.watch(on_failure)?;
        Ok(Self {
            rank: env.rank,
            world_size: env.world_size,
            device,
            group: Some(group),
            nccl,
        })
    }

    #[cfg(not(feature = "cuda"))]
    pub fn start(_env: &DistEnv) -> anyhow::Result<Self> {
        bail!("multi-GPU training needs NCCL: build with `--features cuda`")
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Sums `t` over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> anyhow::Result<()> {
        #[cfg(feature = "cuda")]
        return self.nccl.all_reduce_sum(t);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = t;
            bail!("built without CUDA")
        }
    }

    /// Averages `t` over the ranks, in place.
    pub fn all_reduce_mean(&self, t: &Tensor) -> anyhow::Result<()> {
        self.all_reduce_sum(t)?;
        let _guard = tch::no_grad_guard();
        let mut t = t.shallow_clone();
        let _ = t.g_mul_scalar_(1.0 / self.world_size as f64);
        Ok(())
    }

    /// Copies rank 0's `t` to every rank, in place.
    pub fn broadcast_from_main(&self, t: &Tensor) -> anyhow::Result<()> {
        #[cfg(feature = "cuda")]
        return self.nccl.broadcast(t, 0);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = t;
            bail!("built without CUDA")
        }
    }

    /// Sums a few numbers over the ranks (one small collective, then a host copy).
    pub fn sum_values(&self, values: &[f64]) -> anyhow::Result<Vec<f64>> {
        let t = Tensor::from_slice(values).to_device(Device::Cuda(self.device));
        self.all_reduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double))?)
    }

    /// Tells the other ranks why this one stops (they exit naming it).
    pub fn report_failure(&self, reason: &str) {
        if let Some(g) = &self.group {
            g.report_failure(reason);
        }
    }

    /// The orderly end: the other ranks do not take the closed connections as a failure.
    pub fn finish(mut self) {
        if let Some(g) = self.group.take() {
            g.finish();
        }
    }
}
