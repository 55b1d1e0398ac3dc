//! The fused augment kernel (`augment.cu`): compiled by NVRTC once per loader, launched
//! once per batch on a lane's stream.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::output::{Layout, OutputDtype, OutputSpec, Span};
use crate::{Error, Result};

const SOURCE: &str = include_str!("augment.cu");

/// Where one sample's source pixels are and which part of them to resample; the layout
/// of `struct Sample` in `augment.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct SampleParams {
    pub src: u64,
    pub plane: i64,
    pub xstride: i32,
    pub pitch: i32,
    pub x_lo: i32,
    pub x_size: i32,
    pub y_lo: i32,
    pub y_size: i32,
    pub x_in0: f32,
    pub x_scale: f32,
    pub y_in0: f32,
    pub y_scale: f32,
    pub flip: i32,
    pub pad: i32,
}

/// How a decoded image is laid out in device memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceLayout {
    pub src: u64,
    /// Bytes from one channel to the next (planar: a plane; interleaved: 1).
    pub plane: i64,
    /// Bytes from one pixel to the next (planar: 1; interleaved: 3).
    pub xstride: i32,
    pub pitch: i32,
}

impl SampleParams {
    /// `x` and `y` are the spans the filter may read, relative to the decoded buffer's
    /// pixel (0, 0) (see [`Span`]).
    pub fn new(src: SourceLayout, x: Span, y: Span, out: &OutputSpec, flip: bool) -> Self {
        Self {
            src: src.src,
            plane: src.plane,
            xstride: src.xstride,
            pitch: src.pitch,
            x_lo: x.lo as i32,
            x_size: (x.hi - x.lo) as i32,
            y_lo: y.lo as i32,
            y_size: (y.hi - y.lo) as i32,
            x_in0: x.in0 as f32,
            x_scale: (x.len() / f64::from(out.width)) as f32,
            y_in0: y.in0 as f32,
            y_scale: (y.len() / f64::from(out.height)) as f32,
            flip: i32::from(flip),
            pad: 0,
        }
    }
}

/// `augment.cu` compiled to PTX for `arch` (e.g. `compute_90`); needs only NVRTC.
fn ptx(arch: &str) -> Result<cudarc::nvrtc::Ptx> {
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some("augment.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, opts).map_err(|e| {
        Error::Cuda(format!(
            "NVRTC could not compile augment.cu for {arch}: {e:?}"
        ))
    })
}

pub(crate) struct AugmentKernel {
    func: CudaFunction,
}

impl AugmentKernel {
    /// Compiles `augment.cu` for the context's GPU (tens of milliseconds).
    pub fn compile(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| Error::Cuda(format!("compute capability: {e:?}")))?;
        let ptx = ptx(&format!("compute_{major}{minor}"))?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| Error::Cuda(format!("loading augment.cu: {e:?}")))?;
        let func = module
            .load_function("crop_resize_normalize")
            .map_err(|e| Error::Cuda(format!("augment.cu: {e:?}")))?;
        Ok(Self { func })
    }

    /// Writes `n` samples of `out` (the tensor's data pointer; NCHW or NHWC as `spec`
    /// says) from the `n` [`SampleParams`] at `params` (device memory).
    ///
    /// # Safety
    /// `params` must hold `n` valid samples whose sources are readable device memory, and
    /// `out` must have room for `n` samples of `spec`, both until `stream` passes this.
    pub unsafe fn launch(
        &self,
        stream: &CudaStream,
        params: u64,
        n: usize,
        out: u64,
        spec: &OutputSpec,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let (scale, offset) = spec.scale_offset();
        let dtype: i32 = match spec.dtype {
            OutputDtype::U8 => 0,
            OutputDtype::F16 => 1,
            OutputDtype::Bf16 => 3,
            OutputDtype::F32 => 2,
        };
        let layout: i32 = match spec.layout {
            Layout::Nchw => 0,
            Layout::Nhwc => 1,
        };
        let (w, h) = (spec.width as i32, spec.height as i32);
        let cfg = LaunchConfig {
            grid_dim: (
                (spec.width).div_ceil(32),
                (spec.height).div_ceil(8),
                n as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.func);
        b.arg(&params)
            .arg(&out)
            .arg(&w)
            .arg(&h)
            .arg(&dtype)
            .arg(&layout)
            .arg(&scale[0])
            .arg(&scale[1])
            .arg(&scale[2])
            .arg(&offset[0])
            .arg(&offset[1])
            .arg(&offset[2]);
        b.launch(cfg)
            .map(|_| ())
            .map_err(|e| Error::Cuda(format!("launching the augment kernel: {e:?}")))
    }
}

#[cfg(test)]
mod tests {
    //! The kernel against the CPU augmenter on the same pixels and crop windows.

    use super::*;
    use crate::cpu::augment::Augmenter;
    use crate::gpu::memory::DeviceBuffer;
    use crate::output::{Normalize, WindowEdges};
    use crate::plan::{CenterCrop, CropWindow};
    use cudarc::driver::result as cu;

    /// A noisy gradient: smooth areas and sharp detail both.
    fn image(w: u32, h: u32) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut out = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let base = (x * (c + 1) + y * (3 - c)) as i64 % 200;
                    out.push((base + (state % 56) as i64) as u8);
                }
            }
        }
        out
    }

    fn planar(interleaved: &[u8]) -> Vec<u8> {
        let n = interleaved.len() / 3;
        (0..3)
            .flat_map(|c| interleaved.chunks_exact(3).map(move |p| p[c]).take(n))
            .collect()
    }

    struct Gpu {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        kernel: AugmentKernel,
    }

    fn gpu() -> Gpu {
        let ctx = CudaContext::new(0).expect("a CUDA device");
        // SAFETY: this test orders its buffers by synchronising the stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().unwrap();
        let kernel = AugmentKernel::compile(&ctx).unwrap();
        Gpu {
            ctx,
            stream,
            kernel,
        }
    }

    fn upload(g: &Gpu, bytes: &[u8]) -> DeviceBuffer {
        let buf = DeviceBuffer::new(&g.ctx, bytes.len()).unwrap();
        // SAFETY: the buffer holds `bytes.len()` bytes; callers synchronise the stream
        // before `bytes` goes away.
        unsafe { cu::memcpy_htod_async(buf.ptr(), bytes, g.stream.cu_stream()).unwrap() };
        buf
    }

    /// Runs the kernel for one sample and returns the output bytes.
    fn run(
        g: &Gpu,
        src: SourceLayout,
        w: u32,
        h: u32,
        crop: &CropWindow,
        edges: WindowEdges,
        spec: &OutputSpec,
    ) -> Vec<u8> {
        let x = Span::new(crop.x, crop.width, w, edges).unwrap();
        let y = Span::new(crop.y, crop.height, h, edges).unwrap();
        let p = SampleParams::new(src, x, y, spec, crop.flip);
        // SAFETY: the bytes of a `repr(C)` plain-data struct, borrowed while `p` lives.
        let params = upload(g, unsafe {
            std::slice::from_raw_parts(
                (&p as *const SampleParams).cast::<u8>(),
                std::mem::size_of::<SampleParams>(),
            )
        });
        let out = DeviceBuffer::new(&g.ctx, spec.sample_bytes()).unwrap();
        let mut host = vec![0u8; spec.sample_bytes()];
        // SAFETY: parameters and source are on the device, queued on this stream; `out` and
        // `host` hold one sample; the stream is synchronised before `host` is read.
        unsafe {
            g.kernel
                .launch(&g.stream, params.ptr(), 1, out.ptr(), spec)
                .unwrap();
            cu::memcpy_dtoh_async(&mut host[..], out.ptr(), g.stream.cu_stream()).unwrap();
        }
        g.stream.synchronize().unwrap();
        host
    }

    fn crops(w: u32, h: u32) -> Vec<(CropWindow, WindowEdges)> {
        let c = |x, y, width, height, flip| CropWindow {
            x,
            y,
            width,
            height,
            flip,
        };
        vec![
            (
                c(0.0, 0.0, f64::from(w), f64::from(h), false),
                WindowEdges::Crop,
            ),
            (c(10.0, 7.0, 20.0, 15.0, false), WindowEdges::Crop), // upscale
            (c(31.4, 12.7, 200.3, 150.9, true), WindowEdges::Crop), // fractional, flipped
            (c(100.0, 50.0, 150.0, 40.0, false), WindowEdges::Crop), // squashed
            (CenterCrop::for_crop(64).plan(w, h), WindowEdges::Image),
        ]
    }

    /// Needs NVRTC only, not a GPU: `LD_LIBRARY_PATH=.venv/lib/python3.11/site-packages/
    /// nvidia/cu13/lib cargo test -p convnets-pipeline --features cuda --lib compiles`.
    #[test]
    fn augment_cu_compiles_for_turing_to_hopper() {
        for arch in ["compute_75", "compute_80", "compute_90"] {
            ptx(arch).unwrap();
        }
    }

    #[test]
    fn kernel_matches_the_cpu_augmenter_in_u8() {
        let g = gpu();
        let (w, h) = (317u32, 211u32);
        let img = image(w, h);
        let inter = upload(&g, &img);
        let plan = upload(&g, &planar(&img));
        let spec = OutputSpec {
            width: 64,
            height: 48,
            dtype: OutputDtype::U8,
            layout: Layout::Nchw,
            normalize: None,
        };
        for (crop, edges) in crops(w, h) {
            let mut cpu = vec![0u8; spec.sample_bytes()];
            Augmenter::with_edges(edges)
                .crop_resize_into(&img, w, h, &crop, &spec, &mut cpu)
                .unwrap();
            let layouts = [
                SourceLayout {
                    src: inter.ptr(),
                    plane: 1,
                    xstride: 3,
                    pitch: 3 * w as i32,
                },
                SourceLayout {
                    src: plan.ptr(),
                    plane: i64::from(w * h),
                    xstride: 1,
                    pitch: w as i32,
                },
            ];
            for src in layouts {
                let gpu = run(&g, src, w, h, &crop, edges, &spec);
                let diffs: Vec<i32> = cpu
                    .iter()
                    .zip(&gpu)
                    .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
                    .collect();
                let max = *diffs.iter().max().unwrap();
                let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
                println!(
                    "{crop:?} {edges:?} plane {}: max |gpu - cpu| {max}, mean {mean:.4}",
                    src.plane
                );
                // One rounding (GPU) against two (Pillow's passes) and float against
                // 22-bit fixed point: a level, rarely two.
                assert!(max <= 2 && mean < 0.25, "{crop:?}: max {max}, mean {mean}");
            }
        }
    }

    #[test]
    fn kernel_normalises_and_lays_out_like_the_cpu_augmenter() {
        let g = gpu();
        let (w, h) = (160u32, 120u32);
        let img = image(w, h);
        let inter = upload(&g, &img);
        let src = SourceLayout {
            src: inter.ptr(),
            plane: 1,
            xstride: 3,
            pitch: 3 * w as i32,
        };
        let crop = CropWindow {
            x: 5.5,
            y: 3.0,
            width: 120.0,
            height: 100.0,
            flip: true,
        };
        for (dtype, layout) in [
            (OutputDtype::F32, Layout::Nchw),
            (OutputDtype::F32, Layout::Nhwc),
            (OutputDtype::F16, Layout::Nhwc),
            (OutputDtype::F16, Layout::Nchw),
            (OutputDtype::Bf16, Layout::Nhwc),
        ] {
            let spec = OutputSpec {
                width: 56,
                height: 40,
                dtype,
                layout,
                normalize: Some(Normalize::default()),
            };
            let mut cpu = vec![0u8; spec.sample_bytes()];
            Augmenter::new()
                .crop_resize_into(&img, w, h, &crop, &spec, &mut cpu)
                .unwrap();
            let gpu = run(&g, src, w, h, &crop, WindowEdges::Crop, &spec);
            let values = |b: &[u8]| -> Vec<f32> {
                match dtype {
                    OutputDtype::F32 => b
                        .chunks_exact(4)
                        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
                        .collect(),
                    OutputDtype::Bf16 => b
                        .chunks_exact(2)
                        .map(|c| half::bf16::from_ne_bytes(c.try_into().unwrap()).to_f32())
                        .collect(),
                    _ => b
                        .chunks_exact(2)
                        .map(|c| half::f16::from_ne_bytes(c.try_into().unwrap()).to_f32())
                        .collect(),
                }
            };
            let (c, gv) = (values(&cpu), values(&gpu));
            let max = c
                .iter()
                .zip(&gv)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            println!("{dtype:?} {layout:?}: max |gpu - cpu| {max}");
            // Two u8 levels over the smallest std (0.224), plus f16 rounding near 2.6
            // (bf16: both sides round the same values to 8 bits, one step is 2^-6 there).
            let rounding = if dtype == OutputDtype::Bf16 {
                0.016
            } else {
                0.005
            };
            assert!(
                max <= 2.0 / 255.0 / 0.224 + rounding,
                "{dtype:?} {layout:?}: {max}"
            );
        }
    }
}
