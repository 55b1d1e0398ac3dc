//! The GPU loader on a GPU (built with `--features cuda`, run by `scripts/gpu-run`):
//! batches against the CPU path on the same records, the fallbacks for JPEGs the hardware
//! decoder cannot take, the bad-record policies, exact resume, and memory over epochs.
#![cfg(feature = "cuda")]

mod common;

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use common::*;
use convnets_formats::{Dataset, RecordSource};
use convnets_pipeline::cpu::augment::{Layout, OutputDtype, OutputSpec};
use convnets_pipeline::loader::{
    Backend, BadRecordPolicy, Batch, GpuOptions, Loader, LoaderConfig, LoaderState, Transform,
};
use convnets_pipeline::plan::CenterCrop;
use convnets_pipeline::sampler::SamplerConfig;
use tch::{Device, Kind, Tensor};

fn dataset(dir: &Path, records: &[(Vec<u8>, u32, u32, u32)]) -> Result<Arc<dyn RecordSource>> {
    one_shard_split(dir, records, 4)
}

/// Baseline JPEGs of assorted sizes (the hardware decoder's diet).
fn baseline_records(n: u32) -> Vec<(Vec<u8>, u32, u32, u32)> {
    (0..n)
        .map(|i| {
            let (w, h) = (96 + (i * 37) % 300, 80 + (i * 53) % 220);
            (baseline_jpeg(w, h, u64::from(i)), i % 4, w, h)
        })
        .collect()
}

fn config(
    backend: Backend,
    transform: Transform,
    dtype: OutputDtype,
    layout: Layout,
    batch: usize,
) -> LoaderConfig {
    LoaderConfig {
        backend,
        sampler: SamplerConfig {
            seed: 5,
            batch_size: batch,
            ..Default::default()
        },
        transform,
        output: OutputSpec {
            width: 64,
            height: 64,
            dtype,
            layout,
            normalize: (dtype != OutputDtype::U8).then(Default::default),
        },
        threads: 2,
        prefetch: 2,
        ..Default::default()
    }
}

/// The hardware decoder for everything it takes, so that the assertions about which
/// decoder ran hold on any machine.
fn gpu() -> Backend {
    Backend::Gpu(GpuOptions {
        hardware_share: Some(1.0),
        ..Default::default()
    })
}

/// Every batch of one epoch, images as f64 on the CPU.
fn epoch(loader: &mut Loader) -> Result<Vec<(Tensor, Tensor, Vec<u32>)>> {
    let mut out = Vec::new();
    while let Some(b) = loader.next_batch() {
        let b: Batch = b?;
        out.push((
            b.images.to_device(Device::Cpu).to_kind(Kind::Double),
            // `copy`: a CPU batch's tensors are the loader's reused memory.
            b.labels.to_device(Device::Cpu).copy(),
            b.samples.iter().map(|s| s.index).collect(),
        ));
    }
    Ok(out)
}

/// (mean, max) absolute difference between the two loaders' epochs, in output units.
fn compare(a: &[(Tensor, Tensor, Vec<u32>)], b: &[(Tensor, Tensor, Vec<u32>)]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let (mut sum, mut n, mut max) = (0.0, 0i64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.2, y.2, "same records in the same order");
        assert!(x.1.equal(&y.1), "same labels");
        assert_eq!(x.0.size(), y.0.size());
        let d = (&x.0 - &y.0).abs();
        sum += d.sum(Kind::Double).double_value(&[]);
        n += d.numel() as i64;
        max = max.max(d.max().double_value(&[]));
    }
    (sum / n as f64, max)
}

#[test]
fn gpu_batches_match_the_cpu_path() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = dataset(tmp.path(), &baseline_records(40))?;
    let cases = [
        (
            "eval, u8 NCHW",
            Transform::Eval(CenterCrop::for_crop(64)),
            OutputDtype::U8,
            Layout::Nchw,
            1.5,
            0.1,
        ),
        (
            "train, u8 NCHW",
            Transform::Train(Default::default()),
            OutputDtype::U8,
            Layout::Nchw,
            3.0,
            0.1,
        ),
        (
            "train, f16 NHWC",
            Transform::Train(Default::default()),
            OutputDtype::F16,
            Layout::Nhwc,
            0.05,
            0.0,
        ),
        (
            "train, f32 NCHW",
            Transform::Train(Default::default()),
            OutputDtype::F32,
            Layout::Nchw,
            0.05,
            0.0,
        ),
    ];
    for (name, transform, dtype, layout, mean_limit, hw_min) in cases {
        let mut cpu = Loader::new(
            source.clone(),
            config(Backend::Cpu, transform, dtype, layout, 8),
            LoaderState::default(),
        )?;
        let mut gpu_loader = Loader::new(
            source.clone(),
            config(gpu(), transform, dtype, layout, 8),
            LoaderState::default(),
        )?;
        let (c, g) = (epoch(&mut cpu)?, epoch(&mut gpu_loader)?);
        let (mean, max) = compare(&c, &g);
        let stats = gpu_loader.stats();
        println!(
            "{name}: mean |gpu - cpu| {mean:.4}, max {max:.3}; decoded on hardware {}, on CPU {}",
            stats.decoded_hardware, stats.decoded_cpu
        );
        assert!(mean < mean_limit, "{name}: mean difference {mean}");
        assert!(
            stats.decoded_hardware as f64 >= hw_min * 40.0,
            "{name}: {stats:?}"
        );
        let images = &g[0].0;
        assert_eq!(images.size(), [8, 3, 64, 64]);
    }
    // The GPU batch is on the GPU, in the asked layout and type, labels beside it.
    let mut l = Loader::new(
        source,
        config(
            gpu(),
            Transform::Train(Default::default()),
            OutputDtype::F16,
            Layout::Nhwc,
            8,
        ),
        LoaderState::default(),
    )?;
    let b = l.next_batch().unwrap()?;
    assert_eq!(b.images.device(), Device::Cuda(0));
    assert_eq!(b.images.kind(), Kind::Half);
    assert_eq!(
        b.images.stride(),
        [64 * 64 * 3, 1, 64 * 3, 3],
        "channels_last memory"
    );
    assert_eq!(b.labels.device(), Device::Cuda(0));
    Ok(())
}

#[test]
fn jpegs_the_hardware_cannot_take_are_decoded_on_the_cpu() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut records = baseline_records(12);
    records.push((progressive_jpeg(120, 90, 1), 1, 120, 90));
    records.push((cmyk_jpeg(100, 80, 2), 2, 100, 80));
    records.push((grayscale_jpeg(90, 70, 3), 3, 90, 70));
    records.push((progressive_jpeg(200, 150, 4), 0, 200, 150));
    let source = dataset(tmp.path(), &records)?;
    for transform in [
        Transform::Train(Default::default()),
        Transform::Eval(CenterCrop::for_crop(64)),
    ] {
        let cfg = |backend| config(backend, transform, OutputDtype::U8, Layout::Nchw, 8);
        let mut cpu = Loader::new(source.clone(), cfg(Backend::Cpu), LoaderState::default())?;
        let mut g = Loader::new(source.clone(), cfg(gpu()), LoaderState::default())?;
        let (c, gb) = (epoch(&mut cpu)?, epoch(&mut g)?);
        let (mean, max) = compare(&c, &gb);
        let s = g.stats();
        println!(
            "{transform:?}: hardware {}, CPU {}; mean |gpu - cpu| {mean:.3}, max {max}",
            s.decoded_hardware, s.decoded_cpu
        );
        // (The loader reads ahead into the next epoch, so counts can exceed 16.)
        assert!(s.decoded_hardware + s.decoded_cpu >= 16, "{s:?}");
        assert_eq!(s.hardware_batch_failures, 0, "{s:?}");
        // Progressive and CMYK at least go to the CPU threads.
        assert!(s.decoded_cpu >= 3, "{s:?}");
        assert!(s.decoded_hardware >= 12, "{s:?}");
        assert!(mean < 3.0, "mean difference {mean}");
    }
    Ok(())
}

#[test]
fn bad_records_are_an_error_naming_them_or_a_counted_skip() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut records = baseline_records(10);
    records[3] = (b"\xFF\xD8 definitely not a jpeg".to_vec(), 0, 64, 48);
    records[7] = (png(64, 48, 7), 1, 64, 48);
    let source = dataset(tmp.path(), &records)?;
    let train = Transform::Train(Default::default());

    let mut l = Loader::new(
        source.clone(),
        config(gpu(), train, OutputDtype::U8, Layout::Nchw, 10),
        LoaderState::default(),
    )?;
    let err = l
        .next_batch()
        .unwrap()
        .err()
        .expect("a bad record fails the batch");
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        msg.contains("s-0.cnr") && (msg.contains("record 3") || msg.contains("record 7")),
        "{msg}"
    );

    let mut cfg = config(gpu(), train, OutputDtype::U8, Layout::Nchw, 10);
    cfg.on_bad_record = BadRecordPolicy::Skip;
    let mut l = Loader::new(source, cfg, LoaderState::default())?;
    let b = l.next_batch().unwrap()?;
    assert_eq!(b.len(), 10);
    let bad: Vec<u32> = b
        .samples
        .iter()
        .zip(&b.skipped)
        .filter(|(_, &k)| k)
        .map(|(s, _)| s.index)
        .collect();
    let mut bad_sorted = bad.clone();
    bad_sorted.sort();
    assert_eq!(bad_sorted, [3, 7]);
    drop(b);
    let skipped = l.take_skipped();
    assert_eq!(skipped.len(), 2);
    assert_eq!(l.stats().skipped, 2);
    for s in &skipped {
        assert!(
            s.shard.ends_with("s-0.cnr") && [3, 7].contains(&s.record),
            "{s:?}"
        );
    }
    Ok(())
}

#[test]
fn resume_continues_exactly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = dataset(tmp.path(), &baseline_records(24))?;
    let cfg = || {
        config(
            gpu(),
            Transform::Train(Default::default()),
            OutputDtype::F16,
            Layout::Nhwc,
            4,
        )
    };
    let mut whole = Loader::new(source.clone(), cfg(), LoaderState::default())?;
    let mut all = Vec::new();
    let mut state_after_2 = LoaderState::default();
    for k in 0..9 {
        let b = match whole.next_batch() {
            Some(b) => b?,
            None => whole.next_batch().unwrap()?,
        };
        all.push(b.images.copy());
        if k == 1 {
            state_after_2 = whole.state();
        }
    }
    let mut resumed = Loader::new(source, cfg(), state_after_2)?;
    for expected in &all[2..] {
        let b = match resumed.next_batch() {
            Some(b) => b?,
            None => resumed.next_batch().unwrap()?,
        };
        assert!(b.images.equal(expected), "resumed batch differs");
    }
    Ok(())
}

#[test]
fn memory_stays_flat_over_many_epochs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = dataset(tmp.path(), &baseline_records(48))?;
    let cfg = config(
        gpu(),
        Transform::Train(Default::default()),
        OutputDtype::F16,
        Layout::Nhwc,
        16,
    );
    let mut l = Loader::new(source, cfg, LoaderState::default())?;
    let mut used = Vec::new();
    let mut buffers = Vec::new();
    for _ in 0..60 {
        let mut sum = 0.0;
        while let Some(b) = l.next_batch() {
            sum += b?
                .images
                .to_kind(Kind::Float)
                .sum(Kind::Double)
                .double_value(&[]);
        }
        assert!(sum.is_finite());
        used.push(convnets_pipeline::device::memory_in_use(0)?);
        buffers.push(l.stats().gpu_buffer_bytes);
    }
    let mb = |b: u64| b as f64 / 1048576.0;
    for e in [1, 9, 19, 29, 39, 49, 59] {
        println!(
            "after epoch {}: GPU memory in use {:.1} MiB, loader buffers {:.1} MiB",
            e + 1,
            mb(used[e]),
            mb(buffers[e])
        );
    }
    // Buffers grow to the largest batch seen, then stay.
    assert!(
        used[59] <= used[29] + 8 * 1048576,
        "grew from {} to {}",
        used[29],
        used[59]
    );
    assert_eq!(buffers[59], buffers[29]);
    assert_eq!(l.stats().samples, 60 * 48);
    Ok(())
}

#[test]
fn a_split_between_hardware_and_cpu_repeats_exactly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = dataset(tmp.path(), &baseline_records(32))?;
    let half = Backend::Gpu(GpuOptions {
        hardware_share: Some(0.5),
        ..Default::default()
    });
    let cfg = || {
        config(
            half,
            Transform::Train(Default::default()),
            OutputDtype::U8,
            Layout::Nchw,
            8,
        )
    };
    let mut a = Loader::new(source.clone(), cfg(), LoaderState::default())?;
    let mut b = Loader::new(source, cfg(), LoaderState::default())?;
    let (ea, eb) = (epoch(&mut a)?, epoch(&mut b)?);
    let (mean, _) = compare(&ea, &eb);
    let s = a.stats();
    println!("hardware {}, CPU {}", s.decoded_hardware, s.decoded_cpu);
    assert!(s.decoded_hardware >= 8 && s.decoded_cpu >= 8, "{s:?}");
    assert_eq!(
        mean, 0.0,
        "the same images take the same decoder in every run"
    );
    Ok(())
}

#[test]
fn train_and_eval_run_on_the_gpu_loader() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let images = tmp.path().join("synth");
    let packed = tmp.path().join("packed");
    convnets(&[
        "synth",
        "--output",
        images.to_str().unwrap(),
        "--classes",
        "4",
        "--train-per-class",
        "48",
        "--val-per-class",
        "16",
        "--size",
        "64",
        "--seed",
        "3",
    ])?;
    pack_shards(&images, &packed, 2, 1, &[])?;
    let run = tmp.path().join("run");
    let (p, r) = (packed.to_str().unwrap(), run.to_str().unwrap());
    convnets(&[
        "train",
        "--data",
        p,
        "--loader",
        "gpu",
        "--amp",
        "--arch",
        "resnet18",
        "--image-size",
        "48",
        "--batch-size",
        "16",
        "--epochs",
        "8",
        "--warmup-epochs",
        "1",
        "--lr",
        "2.0",
        "--seed",
        "5",
        "--log-every",
        "4",
        "-o",
        r,
    ])?;
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json"))?)?;
    let top1 = summary["final_eval"]["top1"].as_f64().unwrap_or(0.0);
    println!("GPU-loader run: val top-1 {top1}");
    // Chance is 25 %.
    assert!(top1 >= 0.7, "{summary}");
    assert_eq!(
        summary["final_eval"]["images"], 64,
        "every val image exactly once"
    );

    // The same checkpoint evaluated through both loaders.
    let best = run.join("checkpoints/best");
    let model_cfg = convnets_models::ModelConfig {
        memory_format: convnets_models::MemoryFormat::ChannelsLast,
        ..Default::default()
    };
    let loaded = convnets_tools::checkpoint::load(&best, Device::Cuda(0), &model_cfg)?;
    let val: Arc<dyn RecordSource> = Arc::new(Dataset::open(&packed)?.split("val")?);
    let eval = |backend: Backend| -> Result<f64> {
        let mut cfg = config(
            backend,
            Transform::Eval(CenterCrop::for_crop(48)),
            OutputDtype::F32,
            Layout::Nhwc,
            16,
        );
        cfg.output.width = 48;
        cfg.output.height = 48;
        cfg.sampler.shuffle = false;
        cfg.sampler.last_batch = convnets_pipeline::sampler::LastBatch::Partial;
        let r = convnets_tools::train::evaluate(
            &loaded.model,
            val.clone(),
            cfg,
            Device::Cuda(0),
            false,
        )?;
        assert_eq!(r.images, 64);
        Ok(r.top1)
    };
    let (gpu_top1, cpu_top1) = (eval(gpu())?, eval(Backend::Cpu)?);
    println!("eval top-1: GPU loader {gpu_top1}, CPU loader {cpu_top1}");
    assert!(
        (gpu_top1 - cpu_top1).abs() <= 2.0 / 64.0 + 1e-9,
        "GPU {gpu_top1} vs CPU {cpu_top1}"
    );
    Ok(())
}
