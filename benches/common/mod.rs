//! Generated input shared by the benchmarks: photo-like JPEGs of ImageNet's common shapes,
//! deterministic for a given index, so every bench measures the same images.

#![allow(dead_code)] // each bench uses its own subset

use std::path::Path;

use anyhow::Result;

/// Shapes of generated images: ImageNet's common sizes, 500x375 most of all.
pub const SHAPES: [(u16, u16); 6] = [
    (500, 375),
    (500, 375),
    (375, 500),
    (500, 333),
    (333, 500),
    (500, 400),
];
pub const GENERATED_CLASSES: usize = 10;
pub const JPEG_QUALITY: u8 = 90;

/// SplitMix64: a tiny deterministic generator, enough for pixels and permutations.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
}

pub fn shuffle(v: &mut [usize], seed: u64) {
    let mut rng = Rng(seed);
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

/// Photo-like RGB: smooth gradients and a few low-frequency waves (the "scene") plus
/// sensor-like noise, so baseline JPEG at quality 90 gives ImageNet-like file sizes.
pub fn photo_like(w: usize, h: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut px = vec![0u8; w * h * 3];
    struct Channel {
        base: f32,
        gx: f32,
        gy: f32,
        waves: [(f32, Vec<f32>, Vec<f32>); 3],
    }
    let channels: Vec<Channel> = (0..3)
        .map(|_| Channel {
            base: rng.range(40.0, 200.0),
            gx: rng.range(-60.0, 60.0) / w as f32,
            gy: rng.range(-60.0, 60.0) / h as f32,
            waves: std::array::from_fn(|k| {
                let amp = rng.range(10.0, 40.0) / (k + 1) as f32;
                let (fx, fy) = (
                    rng.range(0.5, 6.0) * (k + 1) as f32,
                    rng.range(0.5, 6.0) * (k + 1) as f32,
                );
                let (px_, py_) = (rng.range(0.0, 6.3), rng.range(0.0, 6.3));
                let sx = (0..w)
                    .map(|x| (fx * x as f32 / w as f32 * std::f32::consts::TAU + px_).sin())
                    .collect();
                let sy = (0..h)
                    .map(|y| (fy * y as f32 / h as f32 * std::f32::consts::TAU + py_).sin())
                    .collect();
                (amp, sx, sy)
            }),
        })
        .collect();
    let noise = rng.range(14.0, 26.0);
    for y in 0..h {
        for x in 0..w {
            let n = rng.next();
            // Luma-like noise shared by channels plus a little per-channel noise.
            let shared = ((n & 0xff) as f32 + ((n >> 8) & 0xff) as f32 - 255.0) / 255.0 * noise;
            for (c, ch) in channels.iter().enumerate() {
                let mut v = ch.base + ch.gx * x as f32 + ch.gy * y as f32 + shared;
                for (amp, sx, sy) in &ch.waves {
                    v += amp * sx[x] * sy[y];
                }
                v += (((n >> (16 + 8 * c)) & 0xff) as f32 - 127.5) / 127.5 * noise * 0.4;
                px[(y * w + x) * 3 + c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    px
}

/// `n` photo-like JPEGs under `root/train/<wnid>/` (10 classes), written by `threads` threads.
pub fn generate_imagenet_like(root: &Path, n: usize, threads: usize) -> Result<()> {
    let train = root.join("train");
    for c in 0..GENERATED_CLASSES {
        std::fs::create_dir_all(train.join(format!("n{c:08}")))?;
    }
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let train = &train;
                s.spawn(move || -> Result<()> {
                    for i in (t..n).step_by(threads) {
                        let mut rng = Rng(i as u64);
                        let (w, h) = SHAPES[rng.below(SHAPES.len() as u64) as usize];
                        let jpeg = photo_jpeg(w, h, rng.next())?;
                        let dir = train.join(format!("n{:08}", i % GENERATED_CLASSES));
                        std::fs::write(dir.join(format!("img_{i:08}.JPEG")), &jpeg)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
        }
        Ok(())
    })
}

/// A `w` x `h` photo-like baseline JPEG, quality [`JPEG_QUALITY`], 4:2:0.
pub fn photo_jpeg(w: u16, h: u16, seed: u64) -> Result<Vec<u8>> {
    let rgb = photo_like(usize::from(w), usize::from(h), seed);
    let mut jpeg = Vec::with_capacity(128 << 10);
    let mut enc = jpeg_encoder::Encoder::new(&mut jpeg, JPEG_QUALITY);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    enc.encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb)?;
    Ok(jpeg)
}
