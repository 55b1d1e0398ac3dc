//! Writes small seed inputs for every fuzz target into `corpus/<target>/` (which git
//! ignores): `cargo run --example make_seeds` from `fuzz/`. Each seed starts with the
//! target's mode/options byte (see the targets' docs).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use convnets_formats::shard::{ShardWriter, HEADER_LEN};
use convnets_formats::tfrecord::{encode_image_example, TfRecordWriter};
use convnets_formats::{ClassInfo, Manifest, ShardInfo, SplitInfo};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let jpegs = jpegs()?;

    // jpeg_header: every JPEG variant and a few other formats, under a few option bytes.
    let mut images: Vec<(String, Vec<u8>)> = jpegs.clone();
    images.extend(other_formats()?);
    for (name, bytes) in &images {
        for opt in [0u8, 0x31, 0x06] {
            write(
                &root,
                "jpeg_header",
                &format!("{name}-{opt:02x}"),
                &[&[opt], bytes.as_slice()].concat(),
            )?;
        }
    }

    // shard_reader: real shards, and the framed form of the same records.
    let records: Vec<&[u8]> = vec![b"abcdef", b"0123456789", &jpegs[0].1];
    let shard = shard_bytes(&records)?;
    write(
        &root,
        "shard_reader",
        "raw-3",
        &[&[0u8], shard.as_slice()].concat(),
    )?;
    write(
        &root,
        "shard_reader",
        "raw-empty",
        &[&[0u8], shard_bytes(&[])?.as_slice()].concat(),
    )?;
    let data: Vec<u8> = records.concat();
    let mut framed = vec![1u8];
    framed.extend_from_slice(&(data.len() as u16).to_le_bytes());
    framed.extend_from_slice(&data);
    let mut offset = HEADER_LEN;
    for (label, r) in records.iter().enumerate() {
        framed.extend_from_slice(&offset.to_le_bytes());
        let crc = crc32c::crc32c(r);
        for v in [r.len() as u32, label as u32, 16, 16, crc, 0] {
            framed.extend_from_slice(&v.to_le_bytes());
        }
        offset += r.len() as u64;
    }
    write(&root, "shard_reader", "framed-3", &framed)?;
    framed[0] = 5; // offsets rewritten by the harness
    write(&root, "shard_reader", "framed-fixed-3", &framed)?;

    // tfrecord_reader: files as build_imagenet_data.py writes them, and the framed form.
    let examples: Vec<Vec<u8>> = jpegs
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, (name, bytes))| {
            encode_image_example(
                bytes,
                i as i64 + 1,
                Some("n01440764"),
                Some("tench, Tinca tinca"),
                Some(name.as_str()),
                Some(16),
                Some(16),
            )
        })
        .collect();
    let mut w = TfRecordWriter::new(Vec::new());
    for ex in &examples {
        w.write_record(ex)?;
    }
    let file = w.into_inner();
    write(
        &root,
        "tfrecord_reader",
        "raw-3",
        &[&[0b0100u8], file.as_slice()].concat(),
    )?;
    write(
        &root,
        "tfrecord_reader",
        "raw-3-two-files",
        &[&[0b0110u8], file.as_slice()].concat(),
    )?;
    write(&root, "tfrecord_reader", "raw-empty", &[0u8])?;
    let mut framed = vec![0b0101u8];
    for ex in &examples {
        framed.extend_from_slice(&(ex.len() as u16).to_le_bytes());
        framed.extend_from_slice(ex);
    }
    write(&root, "tfrecord_reader", "framed-3", &framed)?;
    let minimal = encode_image_example(b"\xff\xd8\xff\xd9", 0, None, None, None, None, None);
    let mut framed = vec![1u8];
    framed.extend_from_slice(&(minimal.len() as u16).to_le_bytes());
    framed.extend_from_slice(&minimal);
    write(&root, "tfrecord_reader", "framed-minimal", &framed)?;

    // manifest: a valid one, and ones that validation must refuse.
    let mut m = Manifest::new(vec![
        ClassInfo {
            wnid: "n01440764".into(),
            name: "tench, Tinca tinca".into(),
        },
        ClassInfo {
            wnid: "n01443537".into(),
            name: "goldfish".into(),
        },
    ]);
    let shard = |file: &str, records| ShardInfo {
        file: file.into(),
        records,
        bytes: 1 << 20,
        crc32c: 0x1234_5678,
    };
    m.splits.insert(
        "train".into(),
        SplitInfo {
            records: 3,
            shards: vec![
                shard("train-00000-of-00002.cnr", 2),
                shard("train-00001-of-00002.cnr", 1),
            ],
        },
    );
    m.splits.insert(
        "val".into(),
        SplitInfo {
            records: 1,
            shards: vec![shard("val-00000-of-00001.cnr", 1)],
        },
    );
    m.created_by =
        serde_json::json!({"tool": "convnets 0.1.0", "seed": 0, "max_side": null, "quality": 95});
    let valid = serde_json::to_string_pretty(&m)?;
    write(&root, "manifest", "valid", valid.as_bytes())?;
    let variants = [
        (
            "traversal",
            valid.replace("val-00000-of-00001.cnr", "../../etc/passwd"),
        ),
        (
            "absolute",
            valid.replace("val-00000-of-00001.cnr", "/etc/passwd"),
        ),
        ("dot", valid.replace("val-00000-of-00001.cnr", ".")),
        (
            "duplicate",
            valid.replace("val-00000-of-00001.cnr", "train-00000-of-00002.cnr"),
        ),
        ("count", valid.replace("\"records\": 3", "\"records\": 4")),
        (
            "huge",
            valid.replace("\"records\": 2", "\"records\": 18446744073709551615"),
        ),
        ("version", valid.replace("\"version\": 1", "\"version\": 2")),
        ("format", valid.replace("convnets-dataset", "other")),
    ];
    for (name, text) in variants {
        write(&root, "manifest", name, text.as_bytes())?;
    }
    println!("seeds written under {}", root.display());
    Ok(())
}

fn write(root: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), bytes)
}

/// Small JPEGs of the kinds the sanitizer tells apart.
fn jpegs() -> Result<Vec<(String, Vec<u8>)>, Box<dyn std::error::Error>> {
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
    let (w, h) = (16u16, 16u16);
    let rgb: Vec<u8> = (0..usize::from(w) * usize::from(h))
        .flat_map(|i| [(i * 7) as u8, (i * 13) as u8, (i * 3) as u8])
        .collect();
    let gray: Vec<u8> = (0..usize::from(w) * usize::from(h))
        .map(|i| (i * 5) as u8)
        .collect();
    let cmyk: Vec<u8> = (0..usize::from(w) * usize::from(h))
        .flat_map(|i| [(i * 7) as u8, (i * 13) as u8, (i * 3) as u8, 40])
        .collect();
    let mut out = Vec::new();
    let variants: [(&str, SamplingFactor, bool, bool, u16); 6] = [
        ("baseline-420", SamplingFactor::F_2_2, false, false, 0),
        ("baseline-444", SamplingFactor::F_1_1, false, false, 0),
        ("baseline-422", SamplingFactor::F_2_1, false, false, 0),
        ("progressive-420", SamplingFactor::F_2_2, true, false, 0),
        ("optimized-420", SamplingFactor::F_2_2, false, true, 0),
        ("restart-420", SamplingFactor::F_2_2, false, false, 1),
    ];
    for (name, sampling, progressive, optimized, restart) in variants {
        let mut bytes = Vec::new();
        let mut enc = Encoder::new(&mut bytes, 90);
        enc.set_sampling_factor(sampling);
        enc.set_progressive(progressive);
        enc.set_optimized_huffman_tables(optimized);
        enc.set_restart_interval(restart);
        enc.encode(&rgb, w, h, ColorType::Rgb)?;
        out.push((name.to_string(), bytes));
    }
    for (name, data, color) in [
        ("gray", &gray, ColorType::Luma),
        ("cmyk", &cmyk, ColorType::Cmyk),
    ] {
        let mut bytes = Vec::new();
        Encoder::new(&mut bytes, 90).encode(data, w, h, color)?;
        out.push((name.to_string(), bytes));
    }
    // Truncated: no EOI.
    let cut = out[0].1[..out[0].1.len() - 10].to_vec();
    out.push(("truncated-420".into(), cut));
    Ok(out)
}

/// The same picture in the other formats the sanitizer re-encodes.
fn other_formats() -> Result<Vec<(String, Vec<u8>)>, Box<dyn std::error::Error>> {
    let img = image::RgbImage::from_fn(12, 10, |x, y| {
        image::Rgb([(x * 20) as u8, (y * 25) as u8, 128])
    });
    let mut out = Vec::new();
    for (name, format) in [
        ("png", image::ImageFormat::Png),
        ("gif", image::ImageFormat::Gif),
        ("bmp", image::ImageFormat::Bmp),
        ("tiff", image::ImageFormat::Tiff),
        ("webp", image::ImageFormat::WebP),
    ] {
        let mut bytes = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone()).write_to(&mut bytes, format)?;
        out.push((name.to_string(), bytes.into_inner()));
    }
    Ok(out)
}

fn shard_bytes(records: &[&[u8]]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let path: PathBuf =
        std::env::temp_dir().join(format!("convnets-fuzz-seed-{}.cnr", std::process::id()));
    let mut w = ShardWriter::create(&path)?;
    for (i, r) in records.iter().enumerate() {
        w.append(r, i as u32, 16, 16)?;
    }
    w.finish()?;
    let bytes = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    Ok(bytes)
}
