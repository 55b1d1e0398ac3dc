//! `convnets predict`: the top-k classes of JPEG files under a trained model. Each image
//! goes through `eval`'s transform (whole-image decode, Resize + CenterCrop as one
//! antialiased resampling, ImageNet normalisation) on CPU threads, in batches; the model
//! runs in eval mode without autograd, on the GPU when there is one. A file that cannot be
//! read or decoded is reported with its path and reason while the others still get results;
//! the command then exits non-zero.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use convnets_formats::ClassInfo;
use convnets_models::{Arch, MemoryFormat, ModelConfig};
use convnets_pipeline::cpu::augment::{Augmenter, Layout, OutputDtype, OutputSpec, WindowEdges};
use convnets_pipeline::cpu::decode::{CpuDecoder, DecodeLimits, RgbImage};
use convnets_pipeline::plan::CenterCrop;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, LoadedModel};
use crate::device_arg::{device_of, DeviceArg};

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// A checkpoint folder (import-weights output, a run's checkpoints/step-N or best), a run
    /// folder (its best checkpoint, else the latest) or a safetensors state_dict (with --arch).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Architecture: needed for a bare safetensors file; checked against a checkpoint's.
    #[arg(long)]
    pub arch: Option<Arch>,
    /// Classes listed per image, most probable first.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Side of the centre crop the model sees (the image is first resized so its shorter
    /// side is 8/7 of it, as `eval` does). Default: the size the checkpoint was trained at
    /// (224 for imported weights).
    #[arg(long)]
    pub image_size: Option<u32>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Decoding threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Use the checkpoint's moving average of the weights (ema.safetensors).
    #[arg(long)]
    pub ema: bool,
    /// Replay the forward pass of full batches from a CUDA graph (GPU), captured after the
    /// first full batch runs eagerly.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_graphs: bool,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// JPEG files, or folders searched recursively for *.jpg / *.jpeg files.
    #[arg(required = true, value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
}

/// One class of one image's top-k.
#[derive(Debug, Clone, Serialize)]
pub struct ClassScore {
    /// Label index (the model's output row).
    pub class: i64,
    /// From the checkpoint's class list; `None` when it has none.
    pub wnid: Option<String>,
    pub name: Option<String>,
    pub probability: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub path: String,
    pub top: Vec<ClassScore>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileError {
    pub path: String,
    pub error: String,
}

pub fn run(a: PredictArgs) -> anyhow::Result<()> {
    if a.top_k == 0 || a.batch_size == 0 || a.image_size == Some(0) {
        bail!("--top-k, --batch-size and --image-size must be at least 1");
    }
    convnets_pipeline::loader::check_threads(a.threads)?;
    let device = device_of(a.device)?;
    let memory_format = MemoryFormat::for_device(device);
    let cfg = ModelConfig {
        memory_format,
        ..ModelConfig::default()
    };
    let loaded = checkpoint::load_any(&a.checkpoint, a.arch, device, &cfg)?;
    if a.ema {
        if a.checkpoint.is_file() {
            bail!(
                "--ema needs a checkpoint folder; {} is a weights file",
                a.checkpoint.display()
            );
        }
        checkpoint::apply_ema(&loaded.vs, &checkpoint::resolve(&a.checkpoint)?)?;
    }
    let image_size = loaded.meta.eval_image_size(a.image_size);
    let files = collect_images(&a.inputs)?;
    if files.is_empty() {
        bail!("no JPEG files (*.jpg, *.jpeg) in {}", list(&a.inputs));
    }
    check_memory(a.batch_size.min(files.len()), image_size, device)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build()?;
    let k = (a.top_k as i64).min(loaded.meta.num_classes);
    let classes = &loaded.meta.classes;
    let table = Table::new(&files);
    let bar = ProgressBar::with_draw_target(Some(files.len() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30} {pos}/{len} images {per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    if !a.json {
        bar.suspend(|| table.header());
    }
    let spec = OutputSpec {
        width: image_size,
        height: image_size,
        dtype: OutputDtype::F32,
        layout: Layout::Nchw,
        normalize: Some(Default::default()),
    };
    let crop = CenterCrop::for_crop(image_size);
    let (mut predictions, mut errors) = (Vec::new(), Vec::new());
    let mut forward = Forward::new(&loaded, a.batch_size, a.cuda_graphs && device.is_cuda());
    for chunk in files.chunks(a.batch_size) {
        let samples: Vec<Result<Vec<u8>, String>> = pool.install(|| {
            chunk
                .par_iter()
                .map_init(Worker::new, |w, path| w.sample(path, &crop, &spec))
                .collect()
        });
        let mut good = Vec::with_capacity(chunk.len());
        let mut pixels = Vec::new();
        let bytes = chunk.len() * spec.sample_bytes();
        pixels.try_reserve_exact(bytes).map_err(|e| {
            anyhow::anyhow!(
                "out of memory on this machine with --batch-size {} at --image-size {image_size}: \
                 allocating {bytes} bytes for a batch of images: {e}",
                a.batch_size
            )
        })?;
        for (path, sample) in chunk.iter().zip(samples) {
            match sample {
                Ok(bytes) => {
                    pixels.extend_from_slice(&bytes);
                    good.push(path);
                }
                Err(error) => {
                    bar.suspend(|| eprintln!("error: {}: {error}", path.display()));
                    errors.push(FileError {
                        path: path.display().to_string(),
                        error,
                    });
                }
            }
        }
        if !good.is_empty() {
            let top =
                top_k(&mut forward, &pixels, good.len(), image_size, k, device).map_err(|e| {
                    crate::memory::name_allocation_failure(e, a.batch_size, image_size, device)
                })?;
            let batch: Vec<Prediction> = good
                .iter()
                .zip(top)
                .map(|(path, top)| Prediction {
                    path: path.display().to_string(),
                    top: top
                        .into_iter()
                        .map(|(class, p)| score(classes, class, p))
                        .collect(),
                })
                .collect();
            if !a.json {
                bar.suspend(|| table.rows(&batch));
            }
            predictions.extend(batch);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if a.json {
        let doc = serde_json::json!({
            "checkpoint": a.checkpoint.display().to_string(),
            "arch": loaded.meta.arch,
            "num_classes": loaded.meta.num_classes,
            "image_size": image_size,
            "top_k": k,
            "images": files.len(),
            "predicted": predictions.len(),
            "failed": errors.len(),
            "predictions": predictions,
            "errors": errors,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    if !errors.is_empty() {
        bail!(
            "{} of {} files could not be predicted (listed above); {} predicted",
            errors.len(),
            files.len(),
            predictions.len()
        );
    }
    eprintln!("{} images predicted", predictions.len());
    Ok(())
}

/// Refuses, before any image is read, a batch whose images cannot fit: in host memory the
/// batch's pixels and the tensor made of them, and one more copy on a GPU.
fn check_memory(batch: usize, image_size: u32, device: Device) -> anyhow::Result<()> {
    let images = |batches| crate::memory::ImageBatches {
        batch,
        size: image_size,
        value_bytes: 4,
        batches,
    };
    images(2).check(Device::Cpu, "a batch's pixels and its tensor")?;
    if device.is_cuda() {
        images(1).check(device, "one batch of images on the model's device")?;
    }
    Ok(())
}

/// The files named, and the JPEG files under the folders named (recursively, sorted per
/// folder). A named file is taken whatever its extension; one that does not exist is kept,
/// so that it is reported as a failed file like any unreadable one.
pub fn collect_images(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found)?;
            found.sort();
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?
    {
        let path = entry
            .with_context(|| format!("reading folder {}", dir.display()))?
            .path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"))
        {
            out.push(path);
        }
    }
    Ok(())
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Per-thread decoding state, reused across images.
struct Worker {
    decoder: Result<CpuDecoder, String>,
    augmenter: Augmenter,
    image: RgbImage,
}

impl Worker {
    fn new() -> Self {
        Self {
            decoder: CpuDecoder::new(DecodeLimits::default()).map_err(|e| e.to_string()),
            // CenterCrop windows: the filter reads past the window, as torchvision's
            // Resize-then-crop does (the loader's eval path).
            augmenter: Augmenter::with_edges(WindowEdges::Image),
            image: RgbImage::default(),
        }
    }

    /// One transformed image (f32 NCHW bytes), or why there is none.
    fn sample(
        &mut self,
        path: &Path,
        crop: &CenterCrop,
        spec: &OutputSpec,
    ) -> Result<Vec<u8>, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        if !bytes.starts_with(&[0xFF, 0xD8]) {
            return Err(not_jpeg(&bytes));
        }
        let decoder = self.decoder.as_mut().map_err(|e| e.clone())?;
        decoder
            .decode_full(&bytes, &mut self.image)
            .map_err(|e| e.to_string())?;
        let window = crop.plan(self.image.width, self.image.height);
        let mut out = Vec::new();
        out.try_reserve_exact(spec.sample_bytes())
            .map_err(|e| format!("allocating {} bytes: {e}", spec.sample_bytes()))?;
        out.resize(spec.sample_bytes(), 0);
        self.augmenter
            .crop_resize_into(
                &self.image.data,
                self.image.width,
                self.image.height,
                &window,
                spec,
                &mut out,
            )
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

fn not_jpeg(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "empty file, not a JPEG".into();
    }
    match image::guess_format(bytes) {
        Ok(format) => format!("a {format:?} image, not a JPEG (predict reads JPEG files)"),
        Err(_) => "not a JPEG file".into(),
    }
}

/// The model as `eval` runs it; on a GPU, batches of the full size replay a CUDA graph
/// captured after the first of them ran eagerly (cuDNN has chosen its kernels by then).
struct Forward<'a> {
    loaded: &'a LoadedModel,
    batch_size: usize,
    graphs: bool,
    full_batches: usize,
    #[cfg(feature = "cuda")]
    graph: Option<(crate::torch_ext::cuda::CudaGraph, Tensor, Tensor)>,
}

impl<'a> Forward<'a> {
    fn new(loaded: &'a LoadedModel, batch_size: usize, graphs: bool) -> Self {
        Self {
            loaded,
            batch_size,
            graphs,
            full_batches: 0,
            #[cfg(feature = "cuda")]
            graph: None,
        }
    }

    /// Logits of `images`; read them before the next call (a replay overwrites them).
    fn logits(&mut self, images: &Tensor) -> anyhow::Result<Tensor> {
        let eager = |x: &Tensor| crate::train::eval_logits(&self.loaded.model, x, false);
        let full = images.size().first() == Some(&(self.batch_size as i64));
        if !(self.graphs && full) {
            return eager(images);
        }
        self.full_batches += 1;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(index) = images.device() {
            if self.graph.is_none() && self.full_batches > 1 {
                let input = images.f_empty_like()?;
                let (graph, output) =
                    crate::torch_ext::cuda::CudaGraph::capture(index, || eager(&input))?;
                self.graph = Some((graph, input, output));
            }
            if let Some((graph, input, output)) = &mut self.graph {
                input.f_copy_(images)?;
                graph.replay()?;
                return Ok(output.shallow_clone());
            }
        }
        eager(images)
    }
}

/// Softmax top-k of `n` samples: per sample, (class, probability) pairs, best first.
fn top_k(
    forward: &mut Forward,
    pixels: &[u8],
    n: usize,
    size: u32,
    k: i64,
    device: Device,
) -> anyhow::Result<Vec<Vec<(i64, f64)>>> {
    let _guard = tch::no_grad_guard();
    let s = i64::from(size);
    let images =
        Tensor::f_from_data_size(pixels, &[n as i64, 3, s, s], Kind::Float)?.f_to_device(device)?;
    let logits = forward.logits(&images)?;
    let probs = logits.f_softmax(-1, Kind::Float)?;
    let (p, idx) = probs.f_topk(k, 1, true, true)?;
    let p: Vec<Vec<f64>> = Vec::try_from(&p.f_to_device(Device::Cpu)?)?;
    let idx: Vec<Vec<i64>> = Vec::try_from(&idx.f_to_device(Device::Cpu)?)?;
    Ok(idx
        .into_iter()
        .zip(p)
        .map(|(i, p)| i.into_iter().zip(p).collect())
        .collect())
}

fn score(classes: &[ClassInfo], class: i64, probability: f64) -> ClassScore {
    let info = usize::try_from(class).ok().and_then(|c| classes.get(c));
    ClassScore {
        class,
        wnid: info.map(|c| c.wnid.clone()),
        name: info.map(|c| c.name.clone()),
        probability,
    }
}

/// The terminal table: one row per (image, rank), the path on the first.
struct Table {
    path_width: usize,
}

impl Table {
    fn new(files: &[PathBuf]) -> Self {
        let path_width = files
            .iter()
            .map(|p| p.display().to_string().chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        Self { path_width }
    }

    fn header(&self) {
        println!(
            "{:<w$}  {:>2}  {:>8}  CLASS",
            "IMAGE",
            "#",
            "PROB",
            w = self.path_width
        );
    }

    fn rows(&self, batch: &[Prediction]) {
        let mut out = std::io::stdout().lock();
        for p in batch {
            for (rank, c) in p.top.iter().enumerate() {
                let path = if rank == 0 { p.path.as_str() } else { "" };
                // Names when the checkpoint has them, else the bare index.
                let label = match (&c.wnid, &c.name) {
                    (Some(w), Some(n)) if w != n => format!("{} {w} {n}", c.class),
                    (Some(w), _) => format!("{} {w}", c.class),
                    _ => c.class.to_string(),
                };
                let _ = writeln!(
                    out,
                    "{path:<w$}  {:>2}  {:>6.2} %  {label}",
                    rank + 1,
                    c.probability * 100.0,
                    w = self.path_width
                );
            }
        }
    }
}
