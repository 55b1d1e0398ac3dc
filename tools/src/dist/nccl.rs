//! NCCL collectives on libtorch tensors (feature `cuda`). Everything runs on the legacy
//! default stream, libtorch's, so a collective is ordered after the kernels that produced
//! its input and before those that read its output, with no extra synchronisation.

use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context};
use cudarc::driver::CudaContext;
use tch::{Kind, Tensor};

/// Bytes of an NCCL unique id, the rendezvous payload.
pub const ID_BYTES: usize = 128;

type Comm = *mut c_void;
type Stream = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; ID_BYTES],
}

// ncclDataType_t and ncclRedOp_t values (stable across NCCL 2.x; bf16 since 2.10).
const NCCL_INT64: c_int = 4;
const NCCL_FLOAT16: c_int = 6;
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_BFLOAT16: c_int = 9; // NCCL >= 2.10
const NCCL_SUM: c_int = 0;

/// The NCCL entry points, taken from the NCCL libtorch already loaded (libtorch_cuda
/// links it). A second NCCL opened beside it gets its internal calls bound to the first
/// one's symbols and reports "corrupted comm object", so there must be only one.
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type Collective =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
type CommFn = unsafe extern "C" fn(Comm) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

struct Api {
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    /// ncclAllReduce(send, recv, count, datatype, op, comm, stream)
    all_reduce: Collective,
    /// ncclBroadcast(send, recv, count, datatype, root, comm, stream)
    broadcast: Collective,
    comm_abort: CommFn,
    comm_destroy: CommFn,
    get_error_string: ErrorString,
}

fn api() -> anyhow::Result<&'static Api> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        // SAFETY: dlsym over the symbols already in the process; each pointer is cast
        // to the signature of nccl.h.
        unsafe {
            let sym = |name: &std::ffi::CStr| -> Result<*mut c_void, String> {
                let p = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
                if p.is_null() {
                    Err(format!(
                        "{} not found: libtorch's NCCL is not loaded (is libtorch_cuda linked?)",
                        name.to_string_lossy()
                    ))
                } else {
                    Ok(p)
                }
            };
            Ok(Api {
                get_unique_id: std::mem::transmute::<*mut c_void, GetUniqueId>(sym(
                    c"ncclGetUniqueId",
                )?),
                comm_init_rank: std::mem::transmute::<*mut c_void, CommInitRank>(sym(
                    c"ncclCommInitRank",
                )?),
                all_reduce: std::mem::transmute::<*mut c_void, Collective>(sym(c"ncclAllReduce")?),
                broadcast: std::mem::transmute::<*mut c_void, Collective>(sym(c"ncclBroadcast")?),
                comm_abort: std::mem::transmute::<*mut c_void, CommFn>(sym(c"ncclCommAbort")?),
                comm_destroy: std::mem::transmute::<*mut c_void, CommFn>(sym(c"ncclCommDestroy")?),
                get_error_string: std::mem::transmute::<*mut c_void, ErrorString>(sym(
                    c"ncclGetErrorString",
                )?),
            })
        }
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

fn check(call: &str, status: c_int) -> anyhow::Result<()> {
    if status == 0 {
        return Ok(());
    }
    let text = api()
        .ok()
        // SAFETY: NCCL returns a static string.
        .map(|a| {
            unsafe { std::ffi::CStr::from_ptr((a.get_error_string)(status)) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    bail!("{call} failed: NCCL error {status} ({text})")
}

/// A new unique id, made by rank 0 and shared with the others by the rendezvous.
pub fn unique_id() -> anyhow::Result<Vec<u8>> {
    let mut id = UniqueId {
        internal: [0; ID_BYTES],
    };
    // SAFETY: out-pointer we own.
    check("ncclGetUniqueId", unsafe {
        (api()?.get_unique_id)(&mut id)
    })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// This rank's communicator.
pub struct Nccl {
    comm: Comm,
    ctx: Arc<CudaContext>,
    pub rank: usize,
    pub world_size: usize,
}

// SAFETY: the communicator is used by one thread at a time (the training loop); the
// watchdog only aborts it, which NCCL allows from another thread.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins the group of `world_size` ranks named by `id` on GPU `device`. Blocks until
    /// every rank has called it.
    pub fn new(device: usize, rank: usize, world_size: usize, id: &[u8]) -> anyhow::Result<Self> {
        if id.len() != ID_BYTES {
            bail!("NCCL id of {} bytes, expected {ID_BYTES}", id.len());
        }
        let ctx = CudaContext::new(device).map_err(|e| anyhow::anyhow!("GPU {device}: {e:?}"))?;
        ctx.bind_to_thread()
            .map_err(|e| anyhow::anyhow!("GPU {device}: {e:?}"))?;
        let mut raw = UniqueId {
            internal: [0; ID_BYTES],
        };
        for (d, &s) in raw.internal.iter_mut().zip(id) {
            *d = s as c_char;
        }
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: out-pointer we own; every rank passes the same id.
        let status =
            unsafe { (api()?.comm_init_rank)(&mut comm, world_size as c_int, raw, rank as c_int) };
        check(
            &format!("ncclCommInitRank (rank {rank} of {world_size})"),
            status,
        )?;
        Ok(Self {
            comm,
            ctx,
            rank,
            world_size,
        })
    }

    fn dtype(t: &Tensor) -> anyhow::Result<c_int> {
        Ok(match t.kind() {
            Kind::Float => NCCL_FLOAT32,
            Kind::Half => NCCL_FLOAT16,
            Kind::BFloat16 => NCCL_BFLOAT16,
            Kind::Double => NCCL_FLOAT64,
            Kind::Int64 => NCCL_INT64,
            k => bail!("NCCL: tensors of {k:?} are not supported"),
        })
    }

    /// `t`'s elements must be one dense block of memory (any dimension order, e.g.
    /// channels_last): its strides span exactly `numel` elements.
    fn check(t: &Tensor) -> anyhow::Result<()> {
        let span: i64 = t
            .size()
            .iter()
            .zip(t.stride())
            .map(|(&n, s)| if n > 1 { (n - 1) * s } else { 0 })
            .sum::<i64>()
            + 1;
        let dense = t.numel() as i64 == span && t.stride().iter().all(|&s| s > 0);
        if !t.device().is_cuda() || !dense {
            bail!(
                "NCCL needs a dense CUDA tensor, got {:?} on {:?}",
                t.size(),
                t.device()
            );
        }
        Ok(())
    }

    /// libtorch's current stream on this communicator's GPU.
    fn stream(&self) -> Stream {
        crate::torch_ext::cuda::current_stream(self.ctx.ordinal()) as Stream
    }

    /// Sums `t` over all ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> anyhow::Result<()> {
        Self::check(t)?;
        let ptr = t.data_ptr();
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        // SAFETY: `t` is a dense device buffer of numel elements of its dtype; libtorch's
        // current stream orders the call with its kernels (and is the capture stream while
        // a training step is captured as a CUDA graph).
        let status = unsafe {
            (api()?.all_reduce)(
                ptr,
                ptr,
                t.numel(),
                Self::dtype(t)?,
                NCCL_SUM,
                self.comm,
                self.stream(),
            )
        };
        check(&format!("ncclAllReduce of {} elements", t.numel()), status)
    }

    /// Diagnostics for `dist-check --nccl`: in-place sums of `count` f32 at `ptr` on
    /// `stream` (0: the legacy default stream).
    pub fn all_reduce_raw(&self, ptr: u64, count: usize, stream: u64) -> anyhow::Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        // SAFETY: the caller passes a device buffer of `count` floats.
        let status = unsafe {
            (api()?.all_reduce)(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                NCCL_FLOAT32,
                NCCL_SUM,
                self.comm,
                stream as Stream,
            )
        };
        check("ncclAllReduce", status)
    }

    /// Copies rank `root`'s `t` to every rank, in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> anyhow::Result<()> {
        Self::check(t)?;
        let ptr = t.data_ptr();
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        // SAFETY: as in all_reduce_sum.
        let status = unsafe {
            (api()?.broadcast)(
                ptr,
                ptr,
                t.numel(),
                Self::dtype(t)?,
                root as c_int,
                self.comm,
                self.stream(),
            )
        };
        check(&format!("ncclBroadcast of {} elements", t.numel()), status)
            .context("broadcasting from rank 0")
    }

    /// Aborts pending collectives (a peer is gone): they return instead of waiting forever.
    pub fn abort(&self) {
        // SAFETY: valid communicator; abort is allowed from another thread.
        if let Ok(api) = api() {
            unsafe {
                let _ = (api.comm_abort)(self.comm);
            }
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created in `new`; not used after this.
        if let Ok(api) = api() {
            unsafe {
                let _ = (api.comm_destroy)(self.comm);
            }
        }
    }
}
