//! Thin owners of nvJPEG's handles for batched decoding on the hardware backend (the
//! GPU's JPEG engines). Each lane of the GPU loader owns one [`BatchDecoder`]; the
//! library handle is shared (nvJPEG handles are thread-safe, states are not).

use std::os::raw::c_int;
use std::sync::Arc;

use nvjpeg_sys::*;

use crate::{Error, Result};

fn check(call: &'static str, status: nvjpegStatus_t) -> Result<()> {
    if status == nvjpegStatus_t_NVJPEG_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Nvjpeg {
            call,
            status: status as i32,
        })
    }
}

/// The nvJPEG library handle on the hardware backend.
pub(crate) struct Library {
    handle: nvjpegHandle_t,
}

// SAFETY: nvJPEG library handles may be used from several threads at once.
unsafe impl Send for Library {}
// SAFETY: as above: calls taking only the library handle are thread-safe.
unsafe impl Sync for Library {}

impl Library {
    /// Fails (status 9, "implementation not supported") on GPUs without JPEG engines.
    pub fn hardware() -> Result<Arc<Self>> {
        let mut handle: nvjpegHandle_t = std::ptr::null_mut();
        // SAFETY: out-pointer we own; default allocators.
        let status = unsafe {
            nvjpegCreateEx(
                nvjpegBackend_t_NVJPEG_BACKEND_HARDWARE,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
                &mut handle,
            )
        };
        check("nvjpegCreateEx(HARDWARE)", status)?;
        Ok(Arc::new(Self { handle }))
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: created in `hardware`; every state made from it is dropped first (they
        // hold an Arc to this).
        unsafe { nvjpegDestroy(self.handle) };
    }
}

/// One image to decode: its bytes, and where the three RGB planes go.
pub(crate) struct Target {
    pub data: *const u8,
    pub len: usize,
    pub planes: [u64; 3],
    pub pitch: usize,
    /// Region of interest `(x, y, w, h)` in image pixels, or the whole image.
    pub roi: Option<(i32, i32, i32, i32)>,
}

/// A decode state, a parsed-stream object and per-image parameters for batches of up to
/// `capacity` images. Not thread-safe: one per lane.
pub(crate) struct BatchDecoder {
    lib: Arc<Library>,
    state: nvjpegJpegState_t,
    stream: nvjpegJpegStream_t,
    params: Vec<nvjpegDecodeParams_t>,
    /// Batch size of the last `nvjpegDecodeBatchedInitialize`, 0 after a failure.
    initialized: usize,
    data: Vec<*const u8>,
    lengths: Vec<usize>,
    images: Vec<nvjpegImage_t>,
}

// SAFETY: the handles are only used by the thread that owns the decoder at a time.
unsafe impl Send for BatchDecoder {}

impl BatchDecoder {
    pub fn new(lib: Arc<Library>, capacity: usize) -> Result<Self> {
        let mut dec = Self {
            lib,
            state: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            params: Vec::with_capacity(capacity),
            initialized: 0,
            data: Vec::with_capacity(capacity),
            lengths: Vec::with_capacity(capacity),
            images: Vec::with_capacity(capacity),
        };
        // SAFETY: out-pointers we own; freed in Drop (null ones are skipped).
        unsafe {
            check(
                "nvjpegJpegStateCreate",
                nvjpegJpegStateCreate(dec.lib.handle, &mut dec.state),
            )?;
            check(
                "nvjpegJpegStreamCreate",
                nvjpegJpegStreamCreate(dec.lib.handle, &mut dec.stream),
            )?;
            for _ in 0..capacity {
                let mut p: nvjpegDecodeParams_t = std::ptr::null_mut();
                check(
                    "nvjpegDecodeParamsCreate",
                    nvjpegDecodeParamsCreate(dec.lib.handle, &mut p),
                )?;
                dec.params.push(p);
                check(
                    "nvjpegDecodeParamsSetOutputFormat",
                    nvjpegDecodeParamsSetOutputFormat(p, nvjpegOutputFormat_t_NVJPEG_OUTPUT_RGB),
                )?;
            }
        }
        Ok(dec)
    }

    /// Whether the hardware decoder takes this JPEG (with this region of interest): it
    /// takes baseline Huffman JPEGs in the common subsamplings, not progressive,
    /// lossless or CMYK ones. `Err` when the header does not parse.
    pub fn supports(&mut self, jpeg: &[u8], roi: Option<(i32, i32, i32, i32)>) -> Result<bool> {
        let p = self.params[0];
        let mut supported: c_int = -1;
        // SAFETY: `jpeg` outlives the call; the stream object is ours.
        unsafe {
            check(
                "nvjpegJpegStreamParseHeader",
                nvjpegJpegStreamParseHeader(
                    self.lib.handle,
                    jpeg.as_ptr(),
                    jpeg.len(),
                    self.stream,
                ),
            )?;
            set_roi(p, roi)?;
            check(
                "nvjpegDecodeBatchedSupportedEx",
                nvjpegDecodeBatchedSupportedEx(self.lib.handle, self.stream, p, &mut supported),
            )?;
        }
        Ok(supported == 0)
    }

    /// Queues the decode of `targets` on `stream` (the hardware engines write the planes
    /// asynchronously; later work on `stream` sees them). On error the whole batch is
    /// undecided and the state is re-initialised on the next call.
    ///
    /// # Safety
    /// Every target's data must stay readable until this returns, and its planes must be
    /// device memory of at least `pitch * roi height` bytes each, not otherwise in use
    /// until `stream` has passed this point.
    pub unsafe fn decode(
        &mut self,
        targets: &[Target],
        stream: *mut std::ffi::c_void,
    ) -> Result<()> {
        if targets.is_empty() {
            return Ok(());
        }
        if targets.len() > self.params.len() {
            return Err(Error::Config(format!(
                "batch of {} images for a decoder of {}",
                targets.len(),
                self.params.len()
            )));
        }
        if self.initialized != targets.len() {
            self.initialized = 0;
            // SAFETY: the handle and state are ours and live while `self` does; plain values.
            check(
                "nvjpegDecodeBatchedInitialize",
                nvjpegDecodeBatchedInitialize(
                    self.lib.handle,
                    self.state,
                    targets.len() as c_int,
                    1,
                    nvjpegOutputFormat_t_NVJPEG_OUTPUT_RGB,
                ),
            )?;
            self.initialized = targets.len();
        }
        self.data.clear();
        self.lengths.clear();
        self.images.clear();
        for (t, &p) in targets.iter().zip(&self.params) {
            // SAFETY: `p` was created in `new` and is only used by this decoder.
            set_roi(p, t.roi)?;
            self.data.push(t.data);
            self.lengths.push(t.len);
            let mut img = nvjpegImage_t::default();
            for c in 0..3 {
                img.channel[c] = t.planes[c] as *mut u8;
                img.pitch[c] = t.pitch;
            }
            self.images.push(img);
        }
        // SAFETY: `data`, `lengths`, `images` and `params` hold one entry per target and
        // outlive the call; the caller guarantees (see `# Safety`) that each target's bytes
        // are readable until this returns and its planes are device memory large enough for
        // the (region of the) image and unused by others until `stream` passes this point.
        // The call only queues the engines' writes on `stream`.
        let status = nvjpegDecodeBatchedEx(
            self.lib.handle,
            self.state,
            self.data.as_ptr(),
            self.lengths.as_ptr(),
            self.images.as_mut_ptr(),
            self.params.as_mut_ptr(),
            stream as cudaStream_t,
        );
        if status != nvjpegStatus_t_NVJPEG_STATUS_SUCCESS {
            self.initialized = 0; // "also use to reset failed batches"
        }
        check("nvjpegDecodeBatchedEx", status)
    }
}

/// Sets (or clears, with the whole image) the region of interest.
///
/// # Safety
/// `p` must be a live decode-parameters handle not in use by another thread.
unsafe fn set_roi(p: nvjpegDecodeParams_t, roi: Option<(i32, i32, i32, i32)>) -> Result<()> {
    // nvJPEG's "whole image" is (0, 0, -1, -1).
    let (x, y, w, h) = roi.unwrap_or((0, 0, -1, -1));
    // SAFETY: `p` is live and ours (the caller's contract); plain values.
    check(
        "nvjpegDecodeParamsSetROI",
        nvjpegDecodeParamsSetROI(p, x, y, w, h),
    )
}

impl Drop for BatchDecoder {
    fn drop(&mut self) {
        // SAFETY: handles created in `new` (or null); the caller synchronises the stream
        // the last batch ran on before dropping.
        unsafe {
            for &p in &self.params {
                nvjpegDecodeParamsDestroy(p);
            }
            if !self.stream.is_null() {
                nvjpegJpegStreamDestroy(self.stream);
            }
            if !self.state.is_null() {
                nvjpegJpegStateDestroy(self.state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The hardware decoder against libjpeg-turbo (the CPU path) on the same JPEGs.

    use super::*;
    use crate::cpu::decode::{CpuDecoder, DecodeLimits, RgbImage};
    use crate::gpu::memory::DeviceBuffer;
    use cudarc::driver::{result as cu, CudaContext};
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};

    /// A smooth photo-like image, or (`edges`) one with a sharp colour checkerboard, the
    /// worst case for chroma upsampling.
    fn jpeg_of(
        w: u16,
        h: u16,
        sampling: SamplingFactor,
        progressive: bool,
        edges: bool,
    ) -> Vec<u8> {
        let mut rgb = Vec::with_capacity(usize::from(w) * usize::from(h) * 3);
        for y in 0..u32::from(h) {
            for x in 0..u32::from(w) {
                let r = (x * 255 / u32::from(w)) as u8;
                let g = (y * 255 / u32::from(h)) as u8;
                let b = if edges {
                    (((x / 8 + y / 8) % 2) * 120 + 60) as u8
                } else {
                    (128.0 + 60.0 * ((x as f32) / 23.0).sin() * ((y as f32) / 17.0).cos()) as u8
                };
                rgb.extend_from_slice(&[r, g, b]);
            }
        }
        let mut out = Vec::new();
        let mut e = Encoder::new(&mut out, 90);
        e.set_sampling_factor(sampling);
        e.set_progressive(progressive);
        e.encode(&rgb, w, h, ColorType::Rgb).unwrap();
        out
    }

    fn jpeg(w: u16, h: u16, sampling: SamplingFactor, progressive: bool) -> Vec<u8> {
        jpeg_of(w, h, sampling, progressive, false)
    }

    /// A JPEG, its region of interest, and the decoded size.
    type Case = (Vec<u8>, Option<(i32, i32, i32, i32)>, (usize, usize));

    /// Decodes `jpegs` in one hardware batch and returns interleaved RGB per image.
    fn hardware_decode(jpegs: &[Case]) -> Vec<Vec<u8>> {
        let ctx = CudaContext::new(0).expect("a CUDA device");
        // SAFETY: no slices exist yet; this test orders its buffers by synchronising.
        unsafe { ctx.disable_event_tracking() };
        ctx.bind_to_thread().unwrap();
        let stream = ctx.new_stream().unwrap();
        let lib = Library::hardware().expect("nvJPEG's hardware backend");
        let mut dec = BatchDecoder::new(lib, jpegs.len()).unwrap();
        let sizes: Vec<usize> = jpegs.iter().map(|(_, _, (w, h))| w * h).collect();
        let arena = DeviceBuffer::new(&ctx, sizes.iter().sum::<usize>() * 3).unwrap();
        let mut offset = 0u64;
        let mut targets = Vec::new();
        for ((data, roi, (w, _)), size) in jpegs.iter().zip(&sizes) {
            assert!(
                dec.supports(data, *roi).unwrap(),
                "hardware should take this JPEG"
            );
            let at = arena.ptr() + offset;
            targets.push(Target {
                data: data.as_ptr(),
                len: data.len(),
                planes: [at, at + *size as u64, at + 2 * *size as u64],
                pitch: *w,
                roi: *roi,
            });
            offset += 3 * *size as u64;
        }
        // SAFETY: `jpegs` outlives the call; the planes lie within `arena` (sized for every
        // image's three planes), which nothing else uses.
        unsafe { dec.decode(&targets, stream.cu_stream().cast()).unwrap() };
        let mut host = vec![0u8; offset as usize];
        // SAFETY: `host` and the arena both hold `offset` bytes; the stream is synchronised
        // before `host` is read.
        unsafe { cu::memcpy_dtoh_async(&mut host[..], arena.ptr(), stream.cu_stream()).unwrap() };
        stream.synchronize().unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        for size in sizes {
            let planes = &host[at..at + 3 * size];
            out.push(
                (0..size)
                    .flat_map(|i| [planes[i], planes[size + i], planes[2 * size + i]])
                    .collect(),
            );
            at += 3 * size;
        }
        out
    }

    fn compare(name: &str, hw: &[u8], cpu: &[u8]) -> (f64, i32) {
        let diffs: Vec<i32> = hw
            .iter()
            .zip(cpu)
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
            .collect();
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        let max = *diffs.iter().max().unwrap();
        println!("{name}: mean |hardware - libjpeg-turbo| {mean:.3}, max {max}");
        (mean, max)
    }

    #[test]
    fn hardware_decode_is_close_to_libjpeg_turbo() {
        let cases = [
            (333u16, 251u16, SamplingFactor::R_4_2_0),
            (640, 480, SamplingFactor::R_4_2_0),
            (200, 300, SamplingFactor::R_4_4_4),
            (257, 129, SamplingFactor::R_4_2_2),
        ];
        let mut jpegs = Vec::new();
        for edges in [false, true] {
            for &(w, h, s) in &cases {
                jpegs.push((
                    jpeg_of(w, h, s, false, edges),
                    None,
                    (usize::from(w), usize::from(h)),
                ));
            }
        }
        let hw = hardware_decode(&jpegs);
        let mut cpu = CpuDecoder::new(DecodeLimits::default()).unwrap();
        for (i, ((data, _, (w, h)), hw)) in jpegs.iter().zip(&hw).enumerate() {
            let edges = i >= cases.len();
            let mut img = RgbImage {
                width: 0,
                height: 0,
                data: Vec::new(),
            };
            cpu.decode_full(data, &mut img).unwrap();
            let name = format!(
                "{w}x{h} {:?}{}",
                cases[i % cases.len()].2,
                if edges { ", colour edges" } else { "" }
            );
            let (mean, max) = compare(&name, hw, &img.data);
            // Different IDCTs and chroma upsampling (libjpeg-turbo's is "fancy"): small
            // differences on smooth content, larger at sharp colour edges.
            let limit = if edges { 8.0 } else { 1.5 };
            assert!(mean < limit, "{name}: mean {mean}, max {max}");
        }
    }

    #[test]
    fn region_of_interest_decodes_the_same_pixels_as_a_full_decode() {
        let data = jpeg(400, 300, SamplingFactor::R_4_2_0, false);
        let roi = (37, 21, 150, 111);
        let hw = hardware_decode(&[
            (data.clone(), Some(roi), (150, 111)),
            (data.clone(), None, (400, 300)),
        ]);
        let (x, y, w, h) = (
            roi.0 as usize,
            roi.1 as usize,
            roi.2 as usize,
            roi.3 as usize,
        );
        let cut: Vec<u8> = (y..y + h)
            .flat_map(|r| hw[1][(r * 400 + x) * 3..(r * 400 + x + w) * 3].to_vec())
            .collect();
        let (mean, max) = compare("roi vs full", &hw[0], &cut);
        assert!(mean < 0.5 && max <= 16, "mean {mean}, max {max}");
    }

    #[test]
    fn progressive_jpegs_are_left_to_the_cpu() {
        let ctx = CudaContext::new(0).expect("a CUDA device");
        ctx.bind_to_thread().unwrap();
        let mut dec = BatchDecoder::new(Library::hardware().unwrap(), 1).unwrap();
        assert!(dec
            .supports(&jpeg(64, 48, SamplingFactor::R_4_2_0, false), None)
            .unwrap());
        assert!(!dec
            .supports(&jpeg(64, 48, SamplingFactor::R_4_2_0, true), None)
            .unwrap());
        assert!(dec.supports(b"\xFF\xD8 not a jpeg", None).is_err());
    }
}
