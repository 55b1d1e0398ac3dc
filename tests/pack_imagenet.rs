//! `convnets pack-imagenet` on ImageNet-like folders: every image lands exactly once with
//! the right label and size, clean JPEGs byte-identical, shuffled across shards,
//! deterministic per seed, and randomly accessible.

mod common;

use std::collections::HashMap;

use anyhow::{ensure, Result};
use common::*;
use convnets_formats::shard::ShardReader;
use convnets_formats::{Dataset, Record, RecordSource};

/// Checks that `split` of the dataset holds each source image of the fixture exactly
/// once, byte-identical, with its label and true size. Returns, for each record in
/// global order, the index of its source image in `fixture.split(split)`.
fn check_split(fixture: &ImageNetFixture, ds: &Dataset, split: &str) -> Result<Vec<usize>> {
    let sources = fixture.split(split);
    let by_bytes: HashMap<&[u8], usize> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| (&s.bytes[..], i))
        .collect();
    let records = read_all(ds, split)?;
    ensure!(
        records.len() == sources.len(),
        "{split}: {} records for {} source images",
        records.len(),
        sources.len()
    );
    let mut seen = vec![false; sources.len()];
    let mut order = Vec::with_capacity(records.len());
    for (i, rec) in records.iter().enumerate() {
        let Some(&s) = by_bytes.get(&rec.data[..]) else {
            anyhow::bail!(
                "{split} record {i} ({} bytes) is not byte-identical to any source image",
                rec.data.len()
            );
        };
        let src = sources[s];
        ensure!(!seen[s], "{split}: {} stored twice", src.rel);
        seen[s] = true;
        ensure!(
            rec.label == src.label,
            "{}: label {} != {}",
            src.rel,
            rec.label,
            src.label
        );
        ensure!(
            (rec.width, rec.height) == (src.width, src.height),
            "{}: index says {}x{}, image is {}x{}",
            src.rel,
            rec.width,
            rec.height,
            src.width,
            src.height
        );
        let decoded = image::load_from_memory(&rec.data)?;
        ensure!(
            (decoded.width(), decoded.height()) == (src.width, src.height),
            "{}: decodes to another size",
            src.rel
        );
        order.push(s);
    }
    ensure!(
        seen.iter().all(|&s| s),
        "{split}: some source images are missing"
    );
    Ok(order)
}

/// Input order of the packer: sorted by path (class folders sorted, files sorted).
fn input_rank(fixture: &ImageNetFixture, split: &str) -> Vec<usize> {
    let sources = fixture.split(split);
    let mut idx: Vec<usize> = (0..sources.len()).collect();
    idx.sort_by(|&a, &b| sources[a].rel.cmp(&sources[b].rel));
    let mut rank = vec![0; sources.len()];
    for (r, i) in idx.into_iter().enumerate() {
        rank[i] = r;
    }
    rank
}

#[test]
fn every_image_is_stored_once_with_its_label_and_size() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &ImageNetSpec::default())?;
    let out = tmp.path().join("packed");
    pack_shards(&fixture.root, &out, 3, 2, &[])?;

    let ds = Dataset::open(&out)?;
    let m = ds.manifest();
    // Labels follow sorted wnid order; names come from LOC_synset_mapping.txt.
    let wnids: Vec<&str> = m.classes.iter().map(|c| c.wnid.as_str()).collect();
    let mut sorted = wnids.clone();
    sorted.sort();
    assert_eq!(wnids, sorted, "classes are in sorted wnid order");
    assert_eq!(
        wnids,
        fixture.wnids.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let names: Vec<&str> = m.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        fixture.names.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(m.classes[0].name, "tench, Tinca tinca");

    assert_eq!(ds.split_names().collect::<Vec<_>>(), ["train", "val"]);
    assert_eq!(m.splits["train"].shards.len(), 3);
    assert_eq!(m.splits["val"].shards.len(), 2);
    assert_eq!(m.splits["train"].records, 24);
    assert_eq!(m.splits["val"].records, 8);
    for split in ["train", "val"] {
        check_split(&fixture, &ds, split)?;
        let counts: Vec<u64> = m.splits[split].shards.iter().map(|s| s.records).collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(
            max - min <= 1,
            "{split}: shard sizes {counts:?} are balanced"
        );
    }

    // All clean: nothing to report, and the counts say so.
    let report = read_report(&out)?;
    assert!(report_files(&report).is_empty(), "{report:#}");
    assert_eq!(report["splits"]["train"]["inputs"], 24);
    assert_eq!(report["splits"]["train"]["kept"], 24);
    assert_eq!(report["splits"]["val"]["kept"], 8);

    // And the whole dataset verifies.
    convnets(&["verify", out.to_str().unwrap(), "--decode"])?;
    Ok(())
}

#[test]
fn records_are_shuffled_across_shards() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &ImageNetSpec::default())?;
    let out = tmp.path().join("packed");
    pack_shards(&fixture.root, &out, 3, 2, &[])?;
    let ds = Dataset::open(&out)?;
    let order = check_split(&fixture, &ds, "train")?;
    let rank = input_rank(&fixture, "train");
    let ranks: Vec<usize> = order.iter().map(|&s| rank[s]).collect();
    assert_ne!(
        ranks,
        (0..ranks.len()).collect::<Vec<_>>(),
        "records are in input order"
    );

    // No shard is a contiguous run of the input order, and every shard mixes classes.
    let sources = fixture.split("train");
    let mut start = 0;
    for shard in &ds.manifest().splits["train"].shards {
        let n = shard.records as usize;
        let mut r: Vec<usize> = ranks[start..start + n].to_vec();
        r.sort();
        assert!(
            r.last().unwrap() - r[0] + 1 > n,
            "{} holds a contiguous run of the input: {r:?}",
            shard.file
        );
        let labels: std::collections::BTreeSet<u32> = order[start..start + n]
            .iter()
            .map(|&s| sources[s].label)
            .collect();
        assert!(
            labels.len() >= 2,
            "{} holds only labels {labels:?}",
            shard.file
        );
        start += n;
    }
    Ok(())
}

#[test]
fn val_in_class_folders_and_names_without_mapping() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let spec = ImageNetSpec {
        classes: 3,
        train_per_class: 4,
        val_per_class: 3,
        val: ValLayout::ClassFolders,
        synset_mapping: false,
        seed: 7,
    };
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &spec)?;
    let out = tmp.path().join("packed");
    pack_shards(&fixture.root, &out, 2, 1, &[])?;
    let ds = Dataset::open(&out)?;
    check_split(&fixture, &ds, "train")?;
    check_split(&fixture, &ds, "val")?;
    // Without a mapping file, the name of a class is its wnid.
    for c in &ds.manifest().classes {
        assert_eq!(c.name, c.wnid);
    }
    Ok(())
}

#[test]
fn flat_val_with_explicit_labels_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let spec = ImageNetSpec {
        classes: 3,
        train_per_class: 3,
        val_per_class: 3,
        ..Default::default()
    };
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &spec)?;
    // Move the labels file away: without it, a flat val/ cannot be labelled...
    let csv = tmp.path().join("elsewhere.csv");
    std::fs::rename(fixture.root.join("LOC_val_solution.csv"), &csv)?;
    let out = tmp.path().join("packed");
    let msg = expect_err(pack_shards(&fixture.root, &out, 2, 1, &[]), &["val"])?;
    assert!(
        msg.contains("--val-labels") || msg.contains("LOC_val_solution"),
        "{msg}"
    );
    // ...and with --val-labels it can.
    let out = tmp.path().join("packed2");
    pack_shards(
        &fixture.root,
        &out,
        2,
        1,
        &["--val-labels", csv.to_str().unwrap()],
    )?;
    let ds = Dataset::open(&out)?;
    check_split(&fixture, &ds, "val")?;
    Ok(())
}

#[test]
fn shard_size_sets_the_number_of_shards() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &ImageNetSpec::default())?;
    let total = |split: &str| {
        fixture
            .split(split)
            .iter()
            .map(|s| s.bytes.len() as u64)
            .sum::<u64>()
    };
    let (train_bytes, val_bytes) = (total("train"), total("val"));
    // About a third of the train input per shard.
    let target = train_bytes / 3 + 1;
    let out = tmp.path().join("packed");
    pack(&fixture.root, &out, &["--shard-size", &target.to_string()])?;
    let ds = Dataset::open(&out)?;
    let m = ds.manifest();
    assert_eq!(
        m.splits["train"].shards.len() as u64,
        train_bytes.div_ceil(target)
    );
    assert_eq!(
        m.splits["val"].shards.len() as u64,
        val_bytes.div_ceil(target)
    );
    for split in ["train", "val"] {
        check_split(&fixture, &ds, split)?;
        for s in &m.splits[split].shards {
            assert!(
                s.bytes < 2 * target,
                "{}: {} bytes for a target of {target}",
                s.file,
                s.bytes
            );
        }
    }

    // Units are accepted; a large size gives one shard per split.
    let out = tmp.path().join("one");
    pack(&fixture.root, &out, &["--shard-size", "1GiB"])?;
    let ds = Dataset::open(&out)?;
    assert_eq!(ds.manifest().splits["train"].shards.len(), 1);
    assert_eq!(ds.manifest().splits["val"].shards.len(), 1);
    check_split(&fixture, &ds, "train")?;
    Ok(())
}

fn records_bytes(records: &[Record]) -> Vec<Vec<u8>> {
    records.iter().map(|r| r.data.to_vec()).collect()
}

#[test]
fn output_is_deterministic_per_seed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &ImageNetSpec::default())?;
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    pack_shards(&fixture.root, &a, 3, 2, &["--seed", "5"])?;
    pack_shards(&fixture.root, &b, 3, 2, &["--seed", "5", "--threads", "1"])?;
    pack_shards(&fixture.root, &c, 3, 2, &["--seed", "6"])?;

    let (files_a, files_b) = (files_of(&a)?, files_of(&b)?);
    let names: Vec<&str> = files_a.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"manifest.json"), "{names:?}");
    assert_eq!(shard_files(&a)?.len(), 5, "{names:?}");
    assert_eq!(files_a.len(), files_b.len());
    for ((na, da), (nb, db)) in files_a.iter().zip(&files_b) {
        assert_eq!(na, nb);
        assert!(
            da == db,
            "{na} differs between two packs with the same seed"
        );
    }

    // Another seed: same records, another order.
    let (da, dc) = (Dataset::open(&a)?, Dataset::open(&c)?);
    check_split(&fixture, &dc, "train")?;
    let (ta, tc) = (
        records_bytes(&read_all(&da, "train")?),
        records_bytes(&read_all(&dc, "train")?),
    );
    assert_ne!(ta, tc, "seeds 5 and 6 give the same train order");
    let (mut sa, mut sc) = (ta.clone(), tc.clone());
    sa.sort();
    sc.sort();
    assert_eq!(sa, sc);
    Ok(())
}

#[test]
fn random_access_matches_the_shards() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fixture = make_imagenet(&tmp.path().join("imagenet"), &ImageNetSpec::default())?;
    let out = tmp.path().join("packed");
    pack_shards(&fixture.root, &out, 3, 2, &[])?;
    let ds = Dataset::open(&out)?;
    for split in ["train", "val"] {
        // Expected: the shards of the manifest, read one after another.
        let mut expected = Vec::new();
        for s in &ds.manifest().splits[split].shards {
            let reader = ShardReader::open(&out.join(&s.file))?;
            for k in 0..reader.len() {
                expected.push((s.file.clone(), k as u64, reader.record(k)?));
            }
        }
        let reader = ds.split(split)?;
        assert_eq!(reader.len(), expected.len());
        let mut rng = Rng::new(42);
        for _ in 0..100 {
            let i = rng.range(0, reader.len() as u64) as usize;
            let rec = reader.record(i)?;
            let (file, local, want) = &expected[i];
            assert_eq!(rec.data, want.data, "{split} record {i}");
            assert_eq!(
                (rec.label, rec.width, rec.height),
                (want.label, want.width, want.height)
            );
            let meta = reader.meta(i)?;
            assert_eq!(
                (meta.label, meta.width, meta.height, meta.len as usize),
                (rec.label, rec.width, rec.height, rec.data.len())
            );
            let (path, k) = reader.locate(i)?;
            assert_eq!(
                (path.file_name().unwrap().to_str().unwrap(), k),
                (file.as_str(), *local)
            );
            assert_eq!(reader.record_unchecked(i)?.data, rec.data);
        }
        assert!(reader.record(reader.len()).is_err());
        assert!(reader.meta(usize::MAX).is_err());
    }
    Ok(())
}
