//! Grow-only device and page-locked host buffers. Each belongs to one lane and is used on
//! that lane's stream only; growing waits for the stream, so no queued work still uses
//! the old memory when it is freed.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use crate::{Error, Result};

fn cuda(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// Device memory, `len` bytes at `ptr`.
pub(crate) struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: a plain allocation; ordering of its uses is the owner's job (see module docs).
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        let mut b = Self {
            ctx: ctx.clone(),
            ptr: 0,
            len: 0,
        };
        b.alloc(len)?;
        Ok(b)
    }

    fn alloc(&mut self, len: usize) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda("binding the context", e))?;
        // SAFETY: a fresh allocation of `len.max(1)` bytes.
        self.ptr = unsafe { result::malloc_sync(len.max(1)) }
            .map_err(|e| cuda(&format!("allocating {len} bytes of GPU memory"), e))?;
        self.len = len;
        Ok(())
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Makes room for `len` bytes (with a quarter to spare, so growth stops soon).
    /// Returns whether it grew. Contents are not kept.
    pub fn reserve(&mut self, len: usize, stream: &CudaStream) -> Result<bool> {
        if len <= self.len {
            return Ok(false);
        }
        stream
            .synchronize()
            .map_err(|e| cuda("waiting for the lane's stream", e))?;
        self.free();
        self.alloc(len + len / 4)?;
        Ok(true)
    }

    fn free(&mut self) {
        if self.ptr != 0 {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: allocated by `alloc`; callers synchronised the stream that used it.
            unsafe {
                let _ = result::free_sync(self.ptr);
            }
            self.ptr = 0;
            self.len = 0;
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.free();
    }
}

/// Page-locked host memory for `T`s (not write-combined: the CPU also reads it).
pub(crate) struct PinnedBuffer<T: Copy> {
    ctx: Arc<CudaContext>,
    ptr: *mut T,
    len: usize,
}

// SAFETY: as for DeviceBuffer.
unsafe impl<T: Copy + Send> Send for PinnedBuffer<T> {}

impl<T: Copy> PinnedBuffer<T> {
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        let mut b = Self {
            ctx: ctx.clone(),
            ptr: std::ptr::null_mut(),
            len: 0,
        };
        b.alloc(len)?;
        Ok(b)
    }

    fn alloc(&mut self, len: usize) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda("binding the context", e))?;
        let bytes = len.max(1) * std::mem::size_of::<T>();
        // SAFETY: a fresh allocation; flags 0 = cached, not write-combined.
        let ptr = unsafe { result::malloc_host(bytes, 0) }
            .map_err(|e| cuda(&format!("allocating {bytes} bytes of pinned memory"), e))?;
        self.ptr = ptr.cast();
        self.len = len;
        Ok(())
    }

    /// Makes room for `len` elements. The caller makes sure no copy from the buffer is
    /// still queued.
    pub fn reserve(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            self.free();
            self.alloc(len + len / 4)?;
        }
        Ok(())
    }

    /// The first `len` elements (after `reserve(len)`), uninitialised contents included.
    pub fn slice_mut(&mut self, len: usize) -> &mut [T] {
        assert!(
            len <= self.len,
            "pinned buffer of {} used for {len}",
            self.len
        );
        // SAFETY: `len` elements were allocated; `T: Copy` with any bit pattern written
        // before it is read (the lanes write what they then copy).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: allocated by `alloc`.
            unsafe {
                let _ = result::free_host(self.ptr.cast());
            }
            self.ptr = std::ptr::null_mut();
            self.len = 0;
        }
    }
}

impl<T: Copy> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        self.free();
    }
}
