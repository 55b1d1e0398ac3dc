//! Collectives over TCP for processes without NCCL (training on CPUs, like PyTorch's gloo
//! backend): a star around rank 0, which sums what the others send and sends the result
//! back. Meant for 1-D tensors on the CPU: gradients, parameters, counters.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tch::{Kind, Tensor};

use super::env::DistEnv;
use super::rendezvous::listen_address;

/// Rank 0's listening socket for the data connections, made before the rendezvous so its
/// port can travel in the rendezvous payload.
pub struct Listener(TcpListener);

impl Listener {
    pub fn bind(env: &DistEnv) -> anyhow::Result<Self> {
        let mut addr = listen_address(env);
        addr.set_port(0);
        let l = TcpListener::bind(addr)
            .with_context(|| format!("rank 0 cannot listen on {addr} for data"))?;
        Ok(Self(l))
    }

    pub fn port(&self) -> anyhow::Result<u16> {
        Ok(self.0.local_addr()?.port())
    }
}

pub struct TcpCollectives {
    rank: usize,
    /// Rank 0: a connection to every other rank (index r - 1). Others: one, to rank 0.
    links: Vec<TcpStream>,
}

impl TcpCollectives {
    /// Connects the group's data links: rank 0 accepts every other rank on `listener`;
    /// the others connect to `MASTER_ADDR:port` (given by the rendezvous).
    pub fn connect(
        env: &DistEnv,
        listener: Option<Listener>,
        port: u16,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        let links = if env.rank == 0 {
            let listener = listener.context("rank 0 needs its data listener")?.0;
            listener.set_nonblocking(true)?;
            let mut slots: Vec<Option<TcpStream>> = (1..env.world_size).map(|_| None).collect();
            while slots.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false)?;
                        let mut r = [0u8; 4];
                        s.read_exact(&mut r)
                            .context("reading a peer's rank on its data link")?;
                        let r = u32::from_le_bytes(r) as usize;
                        match slots.get_mut(r.wrapping_sub(1)) {
                            Some(slot @ None) => *slot = Some(s),
                            _ => {
                                bail!("data link from rank {r}: not a rank of this group, or twice")
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let absent: Vec<usize> = (1..env.world_size)
                                .filter(|&r| slots[r - 1].is_none())
                                .collect();
                            bail!(
                                "data links: ranks {absent:?} did not connect within {timeout:?}"
                            );
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e).context("accepting data links"),
                }
            }
            slots.into_iter().flatten().collect()
        } else {
            let addr = format!("{}:{port}", env.master_addr);
            let mut s = loop {
                match TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("rank {}: data link to rank 0 at {addr}", env.rank)
                        })
                    }
                }
            };
            s.write_all(&(env.rank as u32).to_le_bytes())?;
            vec![s]
        };
        for l in &links {
            l.set_nodelay(true)?;
        }
        Ok(Self {
            rank: env.rank,
            links,
        })
    }

    /// Sums `t` (1-D, f16/bf16/f32/f64/i64, CPU) over the ranks, in place.
    pub fn all_reduce_sum(&mut self, t: &Tensor) -> anyhow::Result<()> {
        let kind = t.kind();
        if self.rank == 0 {
            let mut sum = t.to_kind(kind).contiguous();
            for (i, link) in self.links.iter_mut().enumerate() {
                let peer = read_tensor(link, kind, sum.numel())
                    .with_context(|| format!("all-reduce: from rank {}", i + 1))?;
                sum += peer;
            }
            let bytes = to_bytes(&sum)?;
            for (i, link) in self.links.iter_mut().enumerate() {
                write_frame(link, &bytes)
                    .with_context(|| format!("all-reduce: to rank {}", i + 1))?;
            }
            copy_into(t, &sum);
        } else {
            let link = &mut self.links[0];
            write_frame(link, &to_bytes(t)?).context("all-reduce: to rank 0")?;
            let sum = read_tensor(link, kind, t.numel()).context("all-reduce: from rank 0")?;
            copy_into(t, &sum);
        }
        Ok(())
    }

    /// Copies rank 0's `t` to every rank, in place.
    pub fn broadcast(&mut self, t: &Tensor) -> anyhow::Result<()> {
        if self.rank == 0 {
            let bytes = to_bytes(t)?;
            for (i, link) in self.links.iter_mut().enumerate() {
                write_frame(link, &bytes)
                    .with_context(|| format!("broadcast: to rank {}", i + 1))?;
            }
        } else {
            let v = read_tensor(&mut self.links[0], t.kind(), t.numel())
                .context("broadcast: from rank 0")?;
            copy_into(t, &v);
        }
        Ok(())
    }
}

fn check(t: &Tensor) -> anyhow::Result<()> {
    if t.device().is_cuda() || t.dim() > 1 && !t.is_contiguous() {
        bail!(
            "TCP collectives take contiguous CPU tensors, got {:?} on {:?}",
            t.size(),
            t.device()
        );
    }
    Ok(())
}

fn element_size(kind: Kind) -> anyhow::Result<usize> {
    Ok(match kind {
        Kind::Half | Kind::BFloat16 => 2,
        Kind::Float => 4,
        Kind::Double | Kind::Int64 => 8,
        k => bail!("TCP collectives: tensors of {k:?} are not supported"),
    })
}

fn to_bytes(t: &Tensor) -> anyhow::Result<Vec<u8>> {
    check(t)?;
    let n = t.numel() * element_size(t.kind())?;
    let flat = t.contiguous().view([-1]);
    let mut out = vec![0u8; n];
    flat.copy_data_u8(&mut out, t.numel());
    Ok(out)
}

fn copy_into(t: &Tensor, v: &Tensor) {
    let _guard = tch::no_grad_guard();
    let mut t = t.shallow_clone();
    t.copy_(&v.view(t.size().as_slice()));
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> anyhow::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)?;
    Ok(())
}

fn read_tensor(s: &mut TcpStream, kind: Kind, numel: usize) -> anyhow::Result<Tensor> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)
        .context("the peer closed the connection")?;
    let len = u64::from_le_bytes(len) as usize;
    let want = numel * element_size(kind)?;
    if len != want {
        bail!("a tensor of {len} bytes arrived where {want} were expected: the ranks run different collectives");
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok(Tensor::from_data_size(&buf, &[numel as i64], kind))
}
