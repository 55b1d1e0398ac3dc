//! The CPU loader end to end on packed data made here: determinism across thread counts,
//! exact resume, rank splits, labels, layouts and the bad-record policies.

mod common;

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use common::*;
use convnets_formats::{Dataset, RecordSource};
use convnets_pipeline::cpu::augment::{Layout, OutputDtype, OutputSpec};
use convnets_pipeline::loader::{BadRecordPolicy, Loader, LoaderConfig, LoaderState, Transform};
use convnets_pipeline::plan::CenterCrop;
use convnets_pipeline::sampler::{LastBatch, SamplerConfig};
use tch::Tensor;

fn packed(dir: &Path) -> Result<Arc<dyn RecordSource>> {
    let spec = ImageNetSpec {
        classes: 3,
        train_per_class: 7,
        val_per_class: 3,
        ..Default::default()
    };
    let fixture = make_imagenet(&dir.join("imagenet"), &spec)?;
    pack_shards(&fixture.root, &dir.join("packed"), 3, 1, &[])?;
    Ok(Arc::new(Dataset::open(dir.join("packed"))?.split("train")?))
}

fn config(threads: usize, batch: usize) -> LoaderConfig {
    LoaderConfig {
        sampler: SamplerConfig {
            seed: 11,
            batch_size: batch,
            ..Default::default()
        },
        output: OutputSpec {
            width: 32,
            height: 32,
            dtype: OutputDtype::F32,
            layout: Layout::Nchw,
            normalize: Some(Default::default()),
        },
        threads,
        ..Default::default()
    }
}

/// (epoch, index, images, labels, record indices) of one batch, copied out of the loader.
type Taken = (u64, usize, Tensor, Tensor, Vec<u32>);

/// The next `n` batches, crossing epochs.
fn take(loader: &mut Loader, n: usize) -> Result<Vec<Taken>> {
    let mut out = Vec::new();
    while out.len() < n {
        match loader.next_batch() {
            None => continue,
            Some(b) => {
                let b = b?;
                out.push((
                    b.epoch,
                    b.index,
                    b.images.copy(),
                    b.labels.copy(),
                    b.samples.iter().map(|s| s.index).collect(),
                ));
            }
        }
    }
    Ok(out)
}

fn same(a: &[Taken], b: &[Taken]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.0, x.1, &x.4), (y.0, y.1, &y.4));
        assert!(
            x.2.equal(&y.2),
            "images of epoch {} batch {} differ",
            x.0,
            x.1
        );
        assert!(x.3.equal(&y.3));
    }
}

#[test]
fn same_seed_same_batches_whatever_the_thread_count() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = packed(tmp.path())?;
    let mut one = Loader::new(source.clone(), config(1, 4), LoaderState::default())?;
    let mut three = Loader::new(source.clone(), config(3, 4), LoaderState::default())?;
    let bpe = one.batches_per_epoch();
    assert_eq!(bpe, 21 / 4);
    let (a, b) = (take(&mut one, 2 * bpe)?, take(&mut three, 2 * bpe)?);
    same(&a, &b);
    // Epochs differ in order and crops; images are normalised floats of the right shape.
    assert_ne!(a[0].4, a[bpe].4);
    assert_eq!(a[0].2.size(), [4, 3, 32, 32]);
    let mean = a[0].2.mean(tch::Kind::Float).double_value(&[]);
    assert!(mean.abs() < 3.0, "{mean}");
    // Another seed, other batches.
    let mut cfg = config(2, 4);
    cfg.sampler.seed = 12;
    let c = take(&mut Loader::new(source, cfg, LoaderState::default())?, 1)?;
    assert_ne!(a[0].4, c[0].4);
    Ok(())
}

#[test]
fn resume_continues_exactly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = packed(tmp.path())?;
    let mut full = Loader::new(source.clone(), config(2, 4), LoaderState::default())?;
    let all = take(&mut full, 8)?;

    // Stop after 3 batches, restart from the saved state with another thread count.
    let mut first = Loader::new(source.clone(), config(2, 4), LoaderState::default())?;
    let head = take(&mut first, 3)?;
    let state = first.state();
    assert_eq!(state, LoaderState { epoch: 0, batch: 3 });
    drop(first);
    let json = serde_json::to_string(&state)?;
    let state: LoaderState = serde_json::from_str(&json)?;
    let mut resumed = Loader::new(source, config(3, 4), state)?;
    let tail = take(&mut resumed, 5)?;
    same(&all[..3], &head);
    same(&all[3..], &tail);
    Ok(())
}

#[test]
fn epochs_end_with_none_and_state_rolls_over() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = packed(tmp.path())?;
    let mut loader = Loader::new(source, config(2, 4), LoaderState::default())?;
    let mut n = 0;
    while let Some(b) = loader.next_batch() {
        b?;
        n += 1;
    }
    assert_eq!(n, loader.batches_per_epoch());
    assert_eq!(loader.state(), LoaderState { epoch: 1, batch: 0 });
    let b = loader.next_batch().context("second epoch")??;
    assert_eq!((b.epoch, b.index), (1, 0));
    let stats = loader.stats();
    assert_eq!(stats.samples, (n as u64 + 1) * 4);
    assert!(stats.decode_s > 0.0 && stats.augment_s > 0.0);
    Ok(())
}

#[test]
fn eval_across_ranks_sees_every_record_once_with_its_label() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = packed(tmp.path())?;
    let mut seen = Vec::new();
    for rank in 0..2 {
        let mut cfg = config(2, 4);
        cfg.sampler = SamplerConfig {
            shuffle: false,
            batch_size: 4,
            rank,
            world_size: 2,
            last_batch: LastBatch::Partial,
            ..Default::default()
        };
        cfg.transform = Transform::Eval(CenterCrop {
            resize: 36,
            crop: 32,
        });
        let mut loader = Loader::new(source.clone(), cfg, LoaderState::default())?;
        while let Some(b) = loader.next_batch() {
            let b = b?;
            let labels = Vec::<i64>::try_from(&b.labels)?;
            for (s, l) in b.samples.iter().zip(labels) {
                assert_eq!(l, i64::from(source.meta(s.index as usize)?.label));
                seen.push(s.index);
            }
        }
    }
    seen.sort();
    assert_eq!(seen, (0..source.len() as u32).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn u8_nhwc_holds_the_same_pixels_as_f32_nchw() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = packed(tmp.path())?;
    let mut u8cfg = config(2, 4);
    u8cfg.output.dtype = OutputDtype::U8;
    u8cfg.output.layout = Layout::Nhwc;
    u8cfg.output.normalize = None;
    let mut f32cfg = config(2, 4);
    f32cfg.output.normalize = None;
    let a = take(
        &mut Loader::new(source.clone(), u8cfg, LoaderState::default())?,
        1,
    )?;
    let b = take(&mut Loader::new(source, f32cfg, LoaderState::default())?, 1)?;
    assert_eq!(a[0].2.size(), [4, 3, 32, 32]);
    assert_eq!(
        a[0].2.stride(),
        [32 * 32 * 3, 1, 32 * 3, 3],
        "channels_last strides"
    );
    let diff = (a[0].2.to_kind(tch::Kind::Float) - &b[0].2 * 255.0)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff <= 1.0, "u8 and f32 outputs differ by {diff} levels");
    Ok(())
}

/// A dataset whose record 2 has a valid CRC but is not a decodable JPEG.
fn with_bad_record(dir: &Path) -> Result<Arc<dyn RecordSource>> {
    let records: Vec<_> = (0..6u32)
        .map(|i| match i {
            2 => (b"\xFF\xD8 definitely not a jpeg".to_vec(), 0, 64, 48),
            _ => (baseline_jpeg(64, 48, u64::from(i)), i % 2, 64, 48),
        })
        .collect();
    one_shard_split(dir, &records, 2)
}

#[test]
fn a_bad_record_is_an_error_naming_it_or_a_counted_skip() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = with_bad_record(tmp.path())?;
    let mut cfg = config(2, 3);
    cfg.sampler.shuffle = false;

    let mut strict = Loader::new(source.clone(), cfg.clone(), LoaderState::default())?;
    let err = strict
        .next_batch()
        .context("a batch")?
        .err()
        .context("an error")?;
    let msg = err.to_string();
    assert!(msg.contains("s-0.cnr") && msg.contains("record 2"), "{msg}");
    // The loader goes on with the next batch.
    assert!(strict.next_batch().context("second batch")?.is_ok());

    cfg.on_bad_record = BadRecordPolicy::Skip;
    let mut lenient = Loader::new(source, cfg, LoaderState::default())?;
    let b = lenient.next_batch().context("a batch")??;
    assert_eq!(b.skipped, vec![false, false, true]);
    assert_eq!(b.valid().collect::<Vec<_>>(), vec![true, true, false]);
    assert_eq!(b.images.size()[0], 3);
    drop(b);
    assert_eq!(lenient.stats().skipped, 1);
    let skipped = lenient.take_skipped();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].record, 2);
    assert!(skipped[0].shard.ends_with("s-0.cnr"));
    Ok(())
}

#[test]
fn dropping_mid_epoch_stops_promptly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = packed(tmp.path())?;
    let start = std::time::Instant::now();
    for _ in 0..5 {
        let mut loader = Loader::new(source.clone(), config(3, 4), LoaderState::default())?;
        let held = loader.next_batch().context("batch")??;
        drop(loader);
        drop(held); // a batch outliving its loader is harmless
    }
    assert!(start.elapsed().as_secs() < 20);
    Ok(())
}

#[test]
fn bad_configurations_are_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let source = packed(tmp.path())?;
    assert!(Loader::new(source.clone(), config(1, 64), LoaderState::default()).is_err());
    assert!(Loader::new(
        source,
        config(1, 4),
        LoaderState {
            epoch: 0,
            batch: 99
        }
    )
    .is_err());
    Ok(())
}

#[test]
fn tfrecords_are_loaded_in_place() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_tfrecords(&tmp.path().join("tf"), 3, 4, 2, 5)?;
    let source = convnets_tools::source::open_split(&tmp.path().join("tf"), "val", 1)?;
    assert_eq!(source.len(), fixture.split("val").len());
    let mut cfg = config(2, 2);
    cfg.sampler.shuffle = false;
    cfg.sampler.last_batch = LastBatch::Partial;
    cfg.transform = Transform::Eval(CenterCrop {
        resize: 36,
        crop: 32,
    });
    let mut loader = Loader::new(source.clone(), cfg, LoaderState::default())?;
    let mut labels = Vec::new();
    while let Some(b) = loader.next_batch() {
        labels.extend(Vec::<i64>::try_from(&b?.labels)?);
    }
    let mut expected: Vec<i64> = fixture
        .split("val")
        .iter()
        .map(|i| i64::from(i.label))
        .collect();
    let mut got = labels.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    // The CLI bench reads the same folder.
    let tf = tmp.path().join("tf");
    convnets(&[
        "bench",
        "loader",
        "--data",
        tf.to_str().unwrap(),
        "--split",
        "train",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--warmup-batches",
        "1",
        "--json",
    ])?;
    let err = convnets_tools::source::open_split(tmp.path(), "train", 1)
        .err()
        .context("not a dataset")?;
    assert!(
        err.to_string().contains("neither a packed dataset"),
        "{err}"
    );
    Ok(())
}
