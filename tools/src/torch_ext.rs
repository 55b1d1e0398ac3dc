//! Safe wrappers over the C++ shim in `tools/csrc/` (built by `tools/build.rs` against the
//! libtorch headers): the libtorch calls the training step needs and tch does not bind.
//!
//! - [`fused_sgd`] and [`non_finite_check_and_unscale`]: `torch.optim.SGD(fused=True)` and
//!   GradScaler's unscale/inf check, with the LR, loss scale and found-inf flag as device
//!   tensors, so a step never waits for the GPU.
//! - [`cuda`] (feature `cuda`): CUDA graphs (`at::cuda::CUDAGraph`), libtorch's current
//!   stream, side streams and stream-ordered fences.

use std::ffi::{c_char, c_int, c_void, CStr};

use anyhow::bail;
use tch::Tensor;

extern "C" {
    fn cx_last_error() -> *const c_char;
    fn cx_non_finite_check_and_unscale(
        grads: *const *const c_void,
        n: usize,
        found_inf: *const c_void,
        inv_scale: *const c_void,
    ) -> c_int;
    fn cx_fused_sgd(
        params: *const *const c_void,
        grads: *const *const c_void,
        bufs: *const *const c_void,
        n: usize,
        n_bufs: usize,
        weight_decay: f64,
        momentum: f64,
        lr: *const c_void,
        nesterov: c_int,
        found_inf: *const c_void,
    ) -> c_int;
}

/// The message of the shim's last failure on this thread.
fn last_error(read: unsafe extern "C" fn() -> *const c_char) -> String {
    // SAFETY: the shim returns a NUL-terminated string owned by a thread-local that lives
    // until the next failing call on this thread; it is copied at once.
    unsafe { CStr::from_ptr(read()).to_string_lossy().into_owned() }
}

fn check(status: c_int, what: &str) -> anyhow::Result<()> {
    if status != 0 {
        bail!("{what}: {}", last_error(cx_last_error));
    }
    Ok(())
}

fn ptrs(ts: &[&Tensor]) -> Vec<*const c_void> {
    ts.iter().map(|t| t.as_ptr() as *const c_void).collect()
}

/// Multiplies every gradient by `inv_scale` (a one-element f32 tensor) and sets `found_inf`
/// (one-element f32, zeroed by the caller) to 1 if any element is inf or NaN: one pass, on
/// the device, no synchronisation.
pub fn non_finite_check_and_unscale(
    grads: &[&Tensor],
    found_inf: &Tensor,
    inv_scale: &Tensor,
) -> anyhow::Result<()> {
    let g = ptrs(grads);
    // SAFETY: every pointer is a live tch tensor (an `at::Tensor*`) borrowed for the call.
    let status = unsafe {
        cx_non_finite_check_and_unscale(
            g.as_ptr(),
            g.len(),
            found_inf.as_ptr() as _,
            inv_scale.as_ptr() as _,
        )
    };
    check(status, "finite check of the gradients")
}

/// One SGD update of `params` in place, as PyTorch's fused SGD: `d = g + wd p;
/// buf = momentum buf + d; p -= lr (nesterov ? d + momentum buf : buf)`, skipped on the
/// device when `found_inf` holds 1. `lr` is a one-element tensor on the parameters' device.
/// `bufs` is empty when `momentum` is 0.
#[allow(clippy::too_many_arguments)]
pub fn fused_sgd(
    params: &[&Tensor],
    grads: &[&Tensor],
    bufs: &[&Tensor],
    weight_decay: f64,
    momentum: f64,
    lr: &Tensor,
    nesterov: bool,
    found_inf: Option<&Tensor>,
) -> anyhow::Result<()> {
    if grads.len() != params.len() || !(bufs.is_empty() || bufs.len() == params.len()) {
        bail!(
            "fused SGD: {} parameters, {} gradients, {} momentum buffers",
            params.len(),
            grads.len(),
            bufs.len()
        );
    }
    let (p, g, b) = (ptrs(params), ptrs(grads), ptrs(bufs));
    let inf = found_inf.map_or(std::ptr::null(), |t| t.as_ptr() as *const c_void);
    // SAFETY: as above; the lists have the lengths passed.
    let status = unsafe {
        cx_fused_sgd(
            p.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            p.len(),
            b.len(),
            weight_decay,
            momentum,
            lr.as_ptr() as _,
            c_int::from(nesterov),
            inf,
        )
    };
    check(status, "SGD update")
}

#[cfg(feature = "cuda")]
pub mod cuda {
    //! CUDA graphs and streams through libtorch (`tools/csrc/cuda_graph.cpp`).

    use std::ffi::{c_int, c_void};

    use anyhow::bail;

    #[repr(C)]
    struct RawGraph {
        _private: [u8; 0],
    }
    #[repr(C)]
    struct RawSideStream {
        _private: [u8; 0],
    }
    #[repr(C)]
    struct RawFence {
        _private: [u8; 0],
    }

    extern "C" {
        fn cx_graph_new() -> *mut RawGraph;
        fn cx_graph_free(g: *mut RawGraph);
        fn cx_graph_capture_begin(g: *mut RawGraph, device: c_int) -> c_int;
        fn cx_graph_capture_end(g: *mut RawGraph) -> c_int;
        fn cx_graph_replay(g: *mut RawGraph) -> c_int;
        fn cx_side_stream_enter(device: c_int) -> *mut RawSideStream;
        fn cx_side_stream_exit(s: *mut RawSideStream) -> c_int;
        fn cx_current_stream(device: c_int) -> *mut c_void;
        fn cx_fence_record(device: c_int) -> *mut RawFence;
        fn cx_fence_wait(f: *mut RawFence) -> c_int;
        fn cx_fence_free(f: *mut RawFence);
    }

    fn error(what: &str) -> anyhow::Error {
        anyhow::anyhow!("{what}: {}", super::last_error(super::cx_last_error))
    }

    fn check(status: c_int, what: &str) -> anyhow::Result<()> {
        if status != 0 {
            return Err(error(what));
        }
        Ok(())
    }

    /// libtorch's current CUDA stream on `device` (as a `cudaStream_t`): the legacy default
    /// stream, or the capture stream while a graph is being captured.
    pub fn current_stream(device: usize) -> *mut c_void {
        // SAFETY: a plain query; libtorch initialises its stream pool on first use.
        unsafe { cx_current_stream(device as c_int) }
    }

    /// A captured sequence of libtorch work, replayed with one launch. Tensors the capture
    /// used stay at their addresses: inputs are copied into them before each replay.
    pub struct CudaGraph {
        raw: *mut RawGraph,
        device: usize,
    }

    impl CudaGraph {
        /// Captures what `body` queues on `device` from this thread. Nothing runs: the work
        /// happens at [`CudaGraph::replay`]. `body` must not synchronise with the host.
        pub fn capture<T>(
            device: usize,
            body: impl FnOnce() -> anyhow::Result<T>,
        ) -> anyhow::Result<(Self, T)> {
            // SAFETY: returns an owned object or null (error kept).
            let raw = unsafe { cx_graph_new() };
            if raw.is_null() {
                return Err(error("creating a CUDA graph"));
            }
            let graph = Self { raw, device };
            // SAFETY: `raw` is live; begin and end are paired below on this thread.
            check(
                unsafe { cx_graph_capture_begin(graph.raw, device as c_int) },
                "starting a CUDA graph capture",
            )?;
            let out = body();
            // SAFETY: as above. Ending also closes a capture whose body failed.
            let end = check(
                unsafe { cx_graph_capture_end(graph.raw) },
                "capturing the CUDA graph",
            );
            match (out, end) {
                (Ok(v), Ok(())) => Ok((graph, v)),
                (Err(e), _) => Err(e.context("capturing the CUDA graph")),
                (Ok(_), Err(e)) => Err(e),
            }
        }

        /// Runs the captured work on libtorch's current stream.
        pub fn replay(&mut self) -> anyhow::Result<()> {
            // SAFETY: a captured graph.
            check(
                unsafe { cx_graph_replay(self.raw) },
                "replaying the CUDA graph",
            )
        }

        pub fn device(&self) -> usize {
            self.device
        }
    }

    impl Drop for CudaGraph {
        fn drop(&mut self) {
            // SAFETY: created by cx_graph_new, freed once; its memory pool goes back.
            unsafe { cx_graph_free(self.raw) }
        }
    }

    /// While alive, libtorch's work from this thread goes to a stream from its pool (the
    /// device is synchronised on entry and exit).
    pub struct SideStream {
        raw: *mut RawSideStream,
    }

    impl SideStream {
        pub fn enter(device: usize) -> anyhow::Result<Self> {
            // SAFETY: returns an owned guard or null (error kept).
            let raw = unsafe { cx_side_stream_enter(device as c_int) };
            if raw.is_null() {
                return Err(error("switching to a side stream"));
            }
            Ok(Self { raw })
        }

        /// Back to the previous stream, after the side stream's work is done.
        pub fn exit(mut self) -> anyhow::Result<()> {
            let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
            // SAFETY: the guard from `enter`, freed once.
            check(
                unsafe { cx_side_stream_exit(raw) },
                "leaving the side stream",
            )
        }
    }

    impl Drop for SideStream {
        fn drop(&mut self) {
            if !self.raw.is_null() {
                // SAFETY: as in `exit`.
                unsafe {
                    let _ = cx_side_stream_exit(self.raw);
                }
            }
        }
    }

    /// A point in libtorch's current stream: `wait` returns once the work queued before it
    /// is done (e.g. a copy out of a host buffer that is about to be reused).
    pub struct Fence {
        raw: *mut RawFence,
    }

    // SAFETY: a CUDA event may be waited on from any thread.
    unsafe impl Send for Fence {}

    impl Fence {
        pub fn record(device: usize) -> anyhow::Result<Self> {
            // SAFETY: returns an owned event or null (error kept).
            let raw = unsafe { cx_fence_record(device as c_int) };
            if raw.is_null() {
                bail!("{}", error("recording a CUDA event"));
            }
            Ok(Self { raw })
        }

        pub fn wait(&self) -> anyhow::Result<()> {
            // SAFETY: a recorded event.
            check(
                unsafe { cx_fence_wait(self.raw) },
                "waiting for a CUDA event",
            )
        }
    }

    impl Drop for Fence {
        fn drop(&mut self) {
            // SAFETY: created by cx_fence_record, freed once.
            unsafe { cx_fence_free(self.raw) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn fused_sgd_matches_the_formula_and_skips_on_found_inf() -> anyhow::Result<()> {
        let opts = (Kind::Float, Device::Cpu);
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]);
        let g = Tensor::from_slice(&[0.5f32, 0.25, -1.0]);
        let b = Tensor::from_slice(&[0.1f32, 0.0, -0.2]);
        let lr = Tensor::from(0.1f32);
        let inf = Tensor::zeros([], opts);
        fused_sgd(&[&p], &[&g], &[&b], 0.01, 0.9, &lr, true, Some(&inf))?;
        for i in 0..3 {
            let (p0, g0, b0) = (
                [1.0, -2.0, 3.0][i],
                [0.5, 0.25, -1.0][i],
                [0.1, 0.0, -0.2][i],
            );
            let d = g0 + 0.01 * p0;
            let buf = 0.9 * b0 + d;
            let want = p0 - 0.1 * (d + 0.9 * buf);
            assert!((p.double_value(&[i as i64]) - want).abs() < 1e-6, "{i}");
            assert!((b.double_value(&[i as i64]) - buf).abs() < 1e-6, "{i}");
        }
        let before = (p.copy(), b.copy());
        let inf = Tensor::ones([], opts);
        fused_sgd(&[&p], &[&g], &[&b], 0.01, 0.9, &lr, false, Some(&inf))?;
        assert!(
            p.equal(&before.0) && b.equal(&before.1),
            "a step with found_inf = 1 changes nothing"
        );
        Ok(())
    }

    #[test]
    fn the_finite_check_unscales_and_flags_inf_and_nan() -> anyhow::Result<()> {
        let opts = (Kind::Float, Device::Cpu);
        let g = Tensor::from_slice(&[2.0f32, 4.0]);
        let inf = Tensor::zeros([], opts);
        non_finite_check_and_unscale(&[&g], &inf, &Tensor::from(0.5f32))?;
        assert_eq!(Vec::<f32>::try_from(&g)?, [1.0, 2.0]);
        assert_eq!(inf.double_value(&[]), 0.0);
        for bad in [f32::INFINITY, f32::NAN] {
            let g = Tensor::from_slice(&[1.0f32, bad]);
            let inf = Tensor::zeros([], opts);
            non_finite_check_and_unscale(&[&g], &inf, &Tensor::from(1.0f32))?;
            assert_eq!(inf.double_value(&[]), 1.0, "{bad}");
        }
        Ok(())
    }
}
