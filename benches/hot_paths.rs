//! Criterion micro-benchmarks of the CPU hot paths, one stage at a time, so a change to one
//! stage shows up in its own figure (the end-to-end figures come from `convnets bench`).
//!
//! ```text
//! cargo bench --bench hot_paths                    # everything, about a minute on 2 cores
//! cargo bench --bench hot_paths -- decode          # only benchmarks whose name matches
//! ```
//!
//! At start-up it generates 128 photo-like JPEGs (the generator of `benches/format.rs`:
//! ImageNet's common shapes, mostly 500x375, quality 90, 4:2:0) and packs them (no decode
//! check, shards of ~2 MiB) into a temporary folder, which is deleted again once the split
//! is mapped: the shards stay readable through the mapping.
//!
//! - `shard_read`: `SplitReader::record` (CRC32C over every byte) and `record_unchecked`
//!   over a random permutation of all records, from the page cache; one iteration reads
//!   every record once, throughput in records.
//! - `decode`: `CpuDecoder::decode_full` and `decode_for_crop` (224x224 output) on 500x375
//!   records (16, cycled) with the training crop (`RandomResizedCrop`, 16 plans cycled:
//!   partial decode, mostly at scale 1), and on one 1000x750 JPEG with the evaluation crop
//!   (`CenterCrop::for_crop(224)`), which decodes at DCT scale 1/2.
//! - `crop_resize`: `Augmenter::crop_resize_into` from a decoded 500x375 image to 224x224,
//!   16 `RandomResizedCrop` windows (with flips) cycled, ImageNet-normalised, into fp32 NCHW
//!   and into fp16 NHWC.
//! - `loader`: batch assembly by `Loader` (record, decode, crop/resize into the batch
//!   tensor, train transform, fp32 NCHW 224) with 1 worker thread and with one per core;
//!   one iteration takes one batch of 32 in steady state (the warm-up drains the batches
//!   prepared ahead), throughput in images.

use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use convnets_formats::{Dataset, RecordSource, SplitReader};
use convnets_pack::pack::{pack, PackOptions, PackSource, Quiet, ShardSizing};
use convnets_pack::sanitize::SanitizeOptions;
use convnets_pipeline::cpu::augment::{Augmenter, Layout, OutputDtype, OutputSpec};
use convnets_pipeline::cpu::decode::{CpuDecoder, DecodeLimits, RgbImage};
use convnets_pipeline::loader::{Loader, LoaderConfig, LoaderState};
use convnets_pipeline::plan::{dct_scale_denominator, CenterCrop, CropWindow, RandomResizedCrop};
use convnets_pipeline::sampler::SamplerConfig;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

mod common;
use common::{generate_imagenet_like, photo_jpeg, shuffle};

const IMAGES: usize = 128;
/// Distinct inputs cycled through by the per-image benchmarks.
const CYCLE: usize = 16;
const OUT: u32 = 224;
const BATCH: usize = 32;

/// The packed split and decoded/encoded inputs, made once for every benchmark.
struct Fixture {
    split: Arc<SplitReader>,
    /// Encoded 500x375 records of the split.
    jpegs: Vec<Vec<u8>>,
    /// One encoded 1000x750 JPEG, for the DCT-scaled decode.
    large: Vec<u8>,
    /// The first of `jpegs`, decoded.
    decoded: RgbImage,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| make_fixture().expect("making the benchmark dataset"))
}

fn make_fixture() -> Result<Fixture> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tmp = tempfile::Builder::new()
        .prefix("convnets-bench-hot-paths")
        .tempdir()?;
    let input = tmp.path().join("input");
    generate_imagenet_like(&input, IMAGES, cores)?;
    let packed = tmp.path().join("packed");
    let opts = PackOptions {
        threads: cores,
        sizing: ShardSizing::TargetBytes(2 << 20),
        sanitize: SanitizeOptions {
            verify_decode: false,
            ..SanitizeOptions::default()
        },
        ..PackOptions::default()
    };
    let source = PackSource::ImageFolder {
        root: input,
        val_labels: None,
    };
    pack(&source, &packed, &opts, &Quiet).context("packing the generated images")?;
    let split = Arc::new(Dataset::open(&packed)?.split("train")?);
    // The split has every shard mapped; the files can go (Linux keeps mapped pages).
    drop(tmp);

    let mut jpegs = Vec::new();
    let mut bytes = 0u64;
    for i in 0..split.len() {
        let rec = split.record(i)?;
        bytes += rec.data.len() as u64;
        if (rec.width, rec.height) == (500, 375) && jpegs.len() < CYCLE {
            jpegs.push(rec.data.to_vec());
        }
    }
    anyhow::ensure!(jpegs.len() == CYCLE, "too few 500x375 images generated");
    let mut decoder = CpuDecoder::new(DecodeLimits::default())?;
    let mut decoded = RgbImage::default();
    decoder.decode_full(&jpegs[0], &mut decoded)?;
    let large = photo_jpeg(1000, 750, 0x1a26e)?;
    eprintln!(
        "hot_paths: {} records in {} shards, {:.1} KiB mean; 1000x750 JPEG {:.1} KiB",
        split.len(),
        split.shards().len(),
        bytes as f64 / split.len() as f64 / 1024.0,
        large.len() as f64 / 1024.0
    );
    Ok(Fixture {
        split,
        jpegs,
        large,
        decoded,
    })
}

fn rrc_plans(width: u32, height: u32) -> Vec<CropWindow> {
    let rrc = RandomResizedCrop::default();
    (0..CYCLE as u64)
        .map(|seed| rrc.plan(width, height, seed))
        .collect()
}

fn shard_read(c: &mut Criterion) {
    let f = fixture();
    let mut order: Vec<usize> = (0..f.split.len()).collect();
    shuffle(&mut order, 0x5eed);
    let mut g = c.benchmark_group("shard_read");
    g.throughput(Throughput::Elements(order.len() as u64));
    g.bench_function("record_crc32c/random", |b| {
        b.iter(|| {
            for &i in &order {
                black_box(f.split.record(i).expect("record").data.len());
            }
        })
    });
    g.bench_function("record_unchecked/random", |b| {
        b.iter(|| {
            for &i in &order {
                black_box(f.split.record_unchecked(i).expect("record").data.len());
            }
        })
    });
    g.finish();
}

fn decode(c: &mut Criterion) {
    let f = fixture();
    let mut decoder = CpuDecoder::new(DecodeLimits::default()).expect("decoder");
    let mut out = RgbImage::default();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));

    let mut k = 0usize;
    g.bench_function("full/500x375", |b| {
        b.iter(|| {
            k = (k + 1) % CYCLE;
            decoder.decode_full(&f.jpegs[k], &mut out).expect("decode");
        })
    });
    let plans = rrc_plans(500, 375);
    g.bench_function("crop_rrc224/500x375", |b| {
        b.iter(|| {
            k = (k + 1) % CYCLE;
            let window = decoder
                .decode_for_crop(&f.jpegs[k], &plans[k], OUT, OUT, &mut out)
                .expect("decode");
            black_box(window);
        })
    });

    g.bench_function("full/1000x750", |b| {
        b.iter(|| decoder.decode_full(&f.large, &mut out).expect("decode"))
    });
    let center = CenterCrop::for_crop(OUT).plan(1000, 750);
    let d = dct_scale_denominator(&center, OUT, OUT);
    g.bench_function(format!("crop_center224_dct1_{d}/1000x750"), |b| {
        b.iter(|| {
            let window = decoder
                .decode_for_crop(&f.large, &center, OUT, OUT, &mut out)
                .expect("decode");
            black_box(window);
        })
    });
    g.finish();
}

fn crop_resize(c: &mut Criterion) {
    let f = fixture();
    let src = &f.decoded;
    let plans = rrc_plans(src.width, src.height);
    let mut augmenter = Augmenter::new();
    let mut g = c.benchmark_group("crop_resize");
    g.throughput(Throughput::Elements(1));
    for (name, dtype, layout) in [
        ("rrc224_f32_nchw", OutputDtype::F32, Layout::Nchw),
        ("rrc224_f16_nhwc", OutputDtype::F16, Layout::Nhwc),
    ] {
        let spec = OutputSpec {
            dtype,
            layout,
            ..OutputSpec::default()
        };
        let mut out = vec![0u8; spec.sample_bytes()];
        let mut k = 0usize;
        g.bench_function(format!("{name}/500x375"), |b| {
            b.iter(|| {
                k = (k + 1) % CYCLE;
                augmenter
                    .crop_resize_into(&src.data, src.width, src.height, &plans[k], &spec, &mut out)
                    .expect("crop_resize");
            })
        });
    }
    g.finish();
}

fn loader(c: &mut Criterion) {
    let f = fixture();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("loader");
    // ~0.1 s per batch and thread: few, flat samples keep the group to seconds.
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(BATCH as u64));
    let mut threads = vec![1];
    if cores > 1 {
        threads.push(cores);
    }
    for t in threads {
        let cfg = LoaderConfig {
            sampler: SamplerConfig {
                batch_size: BATCH,
                ..SamplerConfig::default()
            },
            threads: t,
            ..LoaderConfig::default()
        };
        let source: Arc<dyn RecordSource> = f.split.clone();
        let mut loader = Loader::new(source, cfg, LoaderState::default()).expect("loader");
        g.bench_function(format!("batch{BATCH}_f32_nchw224/{t}_threads"), |b| {
            b.iter(|| loop {
                // `None` ends an epoch; the next call starts the next one.
                if let Some(batch) = loader.next_batch() {
                    black_box(batch.expect("batch").len());
                    break;
                }
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = shard_read, decode, crop_resize, loader
}
criterion_main!(hot_paths);
