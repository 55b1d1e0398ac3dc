//! What GPUs this process can use, and whether nvJPEG's hardware decoder is there.

use serde::Serialize;

use crate::{Error, Result};

/// One visible GPU.
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub total_memory_bytes: u64,
    pub compute_capability: (i32, i32),
    /// nvJPEG's hardware (JPEG engine) backend can be created on this GPU.
    pub nvjpeg_hardware: bool,
}

/// True when this binary was built with the `cuda` feature.
pub const fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// Lists the GPUs. Without the `cuda` feature: [`Error::BuiltWithoutCuda`].
pub fn gpus() -> Result<Vec<GpuInfo>> {
    imp::gpus()
}

/// Bytes of GPU `index`'s memory in use, by every process (the driver's free/total).
pub fn memory_in_use(index: usize) -> Result<u64> {
    imp::memory_in_use(index)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn gpus() -> Result<Vec<GpuInfo>> {
        Err(Error::BuiltWithoutCuda {
            what: "the GPU path",
        })
    }

    pub fn memory_in_use(_index: usize) -> Result<u64> {
        Err(Error::BuiltWithoutCuda {
            what: "the GPU path",
        })
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use cudarc::driver::CudaContext;

    fn cuda(e: impl std::fmt::Debug) -> Error {
        Error::Cuda(format!("{e:?}"))
    }

    pub fn gpus() -> Result<Vec<GpuInfo>> {
        // cudarc loads libcuda at run time; on a machine without a driver this panics
        // inside cudarc, so look for the library first and say so plainly.
        if !driver_present() {
            return Err(Error::Cuda(
                "no CUDA driver (libcuda.so.1 not found)".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(cuda)?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count as usize {
            let ctx = CudaContext::new(index).map_err(cuda)?;
            out.push(GpuInfo {
                index,
                name: ctx.name().map_err(cuda)?,
                total_memory_bytes: ctx.total_mem().map_err(cuda)? as u64,
                compute_capability: ctx.compute_capability().map_err(cuda)?,
                nvjpeg_hardware: index == 0 && nvjpeg_hardware_available(),
            });
        }
        Ok(out)
    }

    pub fn memory_in_use(index: usize) -> Result<u64> {
        if !driver_present() {
            return Err(Error::Cuda(
                "no CUDA driver (libcuda.so.1 not found)".into(),
            ));
        }
        let ctx = CudaContext::new(index).map_err(cuda)?;
        let (free, total) = ctx.mem_get_info().map_err(cuda)?;
        Ok((total - free) as u64)
    }

    fn driver_present() -> bool {
        // SAFETY: dlopen/dlclose of a system library with no initialisers we depend on.
        unsafe {
            let name = c"libcuda.so.1";
            let h = libc_dlopen(name.as_ptr(), 1 /* RTLD_LAZY */);
            if h.is_null() {
                return false;
            }
            libc_dlclose(h);
            true
        }
    }

    extern "C" {
        #[link_name = "dlopen"]
        fn libc_dlopen(filename: *const std::os::raw::c_char, flag: i32) -> *mut std::ffi::c_void;
        #[link_name = "dlclose"]
        fn libc_dlclose(handle: *mut std::ffi::c_void) -> i32;
    }

    /// Creates and destroys an nvJPEG handle on the hardware backend (current device).
    fn nvjpeg_hardware_available() -> bool {
        use nvjpeg_sys::*;
        let mut handle: nvjpegHandle_t = std::ptr::null_mut();
        // SAFETY: plain FFI calls with out-pointers we own; the handle is destroyed.
        unsafe {
            let status = nvjpegCreateEx(
                nvjpegBackend_t_NVJPEG_BACKEND_HARDWARE,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
                &mut handle,
            );
            if status != nvjpegStatus_t_NVJPEG_STATUS_SUCCESS {
                return false;
            }
            nvjpegDestroy(handle);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cpu_build_says_built_without_cuda() {
        let e = super::gpus().unwrap_err();
        assert!(e.to_string().contains("built without CUDA"), "{e}");
        assert!(!super::cuda_built());
    }
}
