//! `convnets synth`: a small synthetic ImageNet-like JPEG folder whose classes a small CNN
//! learns within a few epochs at low resolution, for end-to-end tests of packing, loading
//! and training without the real data set.
//!
//! Every class has a fixed visual signature: a pattern (stripes, rings, checkerboard,
//! gradient, dots, waves) at a class-specific angle and period, drawn in a class-specific
//! pair of colours inside a large ellipse. Each image varies it: size and aspect (both
//! orientations, 0.75..1.25 of `size` per side), position and shape of the ellipse,
//! angle, scale and phase of the pattern, colour and brightness jitter, a random
//! background, an occasional distractor shape and pixel noise. Signatures depend on the
//! class index only and the variation on the seed, so two seeds give two samples of the
//! same classes (e.g. a separate test set).
//!
//! ```no_run
//! use convnets_tools::synth::{generate, SynthOptions};
//! let summary = generate(&SynthOptions { output: "/tmp/synth".into(), ..Default::default() })?;
//! assert_eq!(summary.train_images, 10 * 100);
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::f32::consts::{PI, TAU};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, ensure, Context};
use clap::Args;
use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::units::format_bytes;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Folder to create; must not exist or be empty.
    pub output: PathBuf,
    /// Number of classes (wnids `n90000000`, `n90000001`, ...).
    pub classes: usize,
    /// Training images per class.
    pub train_per_class: usize,
    /// Validation images per class (0: no `val/` folder).
    pub val_per_class: usize,
    /// Nominal image side in pixels; each side is drawn from 0.75..1.25 of it.
    pub size: u32,
    /// Seed of the per-image variation (class signatures do not depend on it).
    pub seed: u64,
    /// JPEG quality (baseline, 4:2:0).
    pub quality: u8,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            output: PathBuf::new(),
            classes: 10,
            train_per_class: 100,
            val_per_class: 20,
            size: 96,
            seed: 0,
            quality: 90,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub root: PathBuf,
    /// Wnids in label (sorted) order.
    pub wnids: Vec<String>,
    /// Class names as written to `LOC_synset_mapping.txt`, in label order.
    pub names: Vec<String>,
    pub train_images: usize,
    pub val_images: usize,
    /// Bytes of JPEG written.
    pub bytes: u64,
}

/// Most classes `generate` makes (the signatures repeat in all but detail long before).
pub const MAX_CLASSES: usize = 10_000;
/// Smallest and largest `size`.
pub const SIZE_RANGE: (u32, u32) = (16, 4096);

/// The wnid of class `class`: `n90000000 + class`, clearly not a real ImageNet synset.
pub fn wnid(class: usize) -> String {
    format!("n{:08}", 90_000_000 + class)
}

/// The pattern families; class `c` uses `ALL[c % 6]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Stripes,
    Rings,
    Checkerboard,
    Gradient,
    Dots,
    Waves,
}

impl Pattern {
    pub const ALL: [Pattern; 6] = [
        Pattern::Stripes,
        Pattern::Rings,
        Pattern::Checkerboard,
        Pattern::Gradient,
        Pattern::Dots,
        Pattern::Waves,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Pattern::Stripes => "stripes",
            Pattern::Rings => "rings",
            Pattern::Checkerboard => "checkerboard",
            Pattern::Gradient => "gradient",
            Pattern::Dots => "dots",
            Pattern::Waves => "waves",
        }
    }

    /// Foreground weight in 0..=1 at pattern coordinates `(u, v)` (in periods), with `r`
    /// the distance from the object's centre relative to its radius.
    fn weight(self, u: f32, v: f32, r: f32) -> f32 {
        let s = match self {
            Pattern::Stripes => (TAU * u).sin(),
            Pattern::Rings => (TAU * (u * u + v * v).sqrt()).sin(),
            Pattern::Checkerboard => (TAU * u).sin() * (TAU * v).sin() * 2.0,
            // Along the class direction, across the whole object.
            Pattern::Gradient => {
                return (0.5 + 0.6 * u.clamp(-1.0, 1.0) * (1.0 - 0.2 * r)).clamp(0.0, 1.0)
            }
            Pattern::Dots => (TAU * u).cos() * (TAU * v).cos() * 2.0 - 0.9,
            Pattern::Waves => (TAU * (u + 0.35 * (TAU * v * 0.5).sin())).sin(),
        };
        smoothstep(-0.35, 0.35, s)
    }
}

/// A class's fixed visual signature.
#[derive(Debug, Clone, Copy)]
pub struct ClassSignature {
    pub pattern: Pattern,
    /// Foreground and background colours, RGB in 0..=1.
    pub fg: [f32; 3],
    pub bg: [f32; 3],
    /// Hues (0..1) of `fg` and `bg`, for names.
    pub fg_hue: f32,
    pub bg_hue: f32,
    /// Pattern direction in radians.
    pub angle: f32,
    /// Pattern period as a fraction of the image's short side.
    pub period: f32,
}

/// The signature of class `class`: low-discrepancy sequences keep the hues, angles and
/// periods of the first classes far apart; classes `c` and `c + 6` share a pattern but
/// not colours.
pub fn class_signature(class: usize) -> ClassSignature {
    let c = class as f32;
    let frac = |x: f32| x - x.floor();
    let pattern = Pattern::ALL[class % Pattern::ALL.len()];
    let fg_hue = frac(c * 0.618_034 + 0.02);
    let bg_hue = frac(fg_hue + 0.42 + 0.16 * frac(c * 0.414_214));
    // Alternate bright-on-dark and dark-on-bright so value is a cue as well.
    let (fg_v, bg_v) = if class % 2 == 0 {
        (0.95, 0.35)
    } else {
        (0.4, 0.9)
    };
    ClassSignature {
        pattern,
        fg: hsv_to_rgb(fg_hue, 0.85, fg_v),
        bg: hsv_to_rgb(bg_hue, 0.65, bg_v),
        fg_hue,
        bg_hue,
        angle: frac(c * 0.754_878 + 0.1)
            * PI
            * if pattern == Pattern::Gradient {
                2.0
            } else {
                1.0
            },
        period: 0.13 + 0.14 * frac(c * 0.569_840 + 0.3),
    }
}

/// A made-up class name such as `red stripes on azure, synthetic 0`.
pub fn class_name(class: usize) -> String {
    let s = class_signature(class);
    format!(
        "{} {} on {}, synthetic {class}",
        hue_name(s.fg_hue),
        s.pattern.name(),
        hue_name(s.bg_hue)
    )
}

fn hue_name(hue: f32) -> &'static str {
    const NAMES: [&str; 12] = [
        "red", "orange", "yellow", "lime", "green", "jade", "cyan", "azure", "blue", "violet",
        "magenta", "rose",
    ];
    NAMES[((hue * 12.0 + 0.5) as usize) % 12]
}

/// Writes the folder `opts.output`: `train/<wnid>/<wnid>_<k>.JPEG`,
/// `val/<wnid>/ILSVRC2012_val_<n>.JPEG` and `LOC_synset_mapping.txt`. The same options
/// give byte-identical files, in parallel or not.
pub fn generate(opts: &SynthOptions) -> anyhow::Result<SynthSummary> {
    ensure!(
        (1..=MAX_CLASSES).contains(&opts.classes),
        "--classes must be 1..={MAX_CLASSES}, got {}",
        opts.classes
    );
    ensure!(
        opts.train_per_class >= 1,
        "--train-per-class must be at least 1"
    );
    ensure!(
        opts.train_per_class < 1 << 28 && opts.val_per_class < 1 << 28,
        "too many images per class"
    );
    ensure!(
        (SIZE_RANGE.0..=SIZE_RANGE.1).contains(&opts.size),
        "--size must be {}..={}, got {}",
        SIZE_RANGE.0,
        SIZE_RANGE.1,
        opts.size
    );
    ensure!(
        (1..=100).contains(&opts.quality),
        "JPEG quality must be 1..=100"
    );
    let root = &opts.output;
    refuse_non_empty(root)?;

    let wnids: Vec<String> = (0..opts.classes).map(wnid).collect();
    let names: Vec<String> = (0..opts.classes).map(class_name).collect();
    let mut tasks = Vec::with_capacity(opts.classes * (opts.train_per_class + opts.val_per_class));
    for (class, w) in wnids.iter().enumerate() {
        let dir = root.join("train").join(w);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for k in 0..opts.train_per_class {
            tasks.push(Task {
                split: 0,
                class,
                index: k,
                path: dir.join(format!("{w}_{k}.JPEG")),
            });
        }
    }
    if opts.val_per_class > 0 {
        for (class, w) in wnids.iter().enumerate() {
            let dir = root.join("val").join(w);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for k in 0..opts.val_per_class {
                let n = class * opts.val_per_class + k + 1;
                tasks.push(Task {
                    split: 1,
                    class,
                    index: k,
                    path: dir.join(format!("ILSVRC2012_val_{n:08}.JPEG")),
                });
            }
        }
    }

    let bytes = AtomicU64::new(0);
    tasks.par_iter().try_for_each(|t| -> anyhow::Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        // One ChaCha stream per image: independent of thread count and order.
        rng.set_stream(((t.split as u64) << 56) | ((t.class as u64) << 28) | t.index as u64);
        let (width, height, rgb) = draw(&class_signature(t.class), opts.size, &mut rng);
        let jpeg = encode_jpeg(&rgb, width, height, opts.quality)?;
        std::fs::write(&t.path, &jpeg).with_context(|| format!("writing {}", t.path.display()))?;
        bytes.fetch_add(jpeg.len() as u64, Ordering::Relaxed);
        Ok(())
    })?;

    let mapping: String = wnids
        .iter()
        .zip(&names)
        .map(|(w, n)| format!("{w} {n}\n"))
        .collect();
    let path = root.join("LOC_synset_mapping.txt");
    std::fs::write(&path, mapping).with_context(|| format!("writing {}", path.display()))?;

    Ok(SynthSummary {
        root: root.clone(),
        wnids,
        names,
        train_images: opts.classes * opts.train_per_class,
        val_images: opts.classes * opts.val_per_class,
        bytes: bytes.into_inner(),
    })
}

struct Task {
    /// 0 train, 1 val.
    split: u8,
    class: usize,
    index: usize,
    path: PathBuf,
}

fn refuse_non_empty(root: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(root) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "output folder {} is not empty; synth writes only into a new or empty folder",
                    root.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if root.exists() && !root.is_dir() => {
            Err(e).with_context(|| format!("output {} exists and is not a folder", root.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading output folder {}", root.display())),
    }
}

fn encode_jpeg(rgb: &[u8], width: u32, height: u32, quality: u8) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(rgb.len() / 8);
    let mut encoder = Encoder::new(&mut out, quality);
    encoder.set_sampling_factor(SamplingFactor::R_4_2_0);
    encoder
        .encode(rgb, width as u16, height as u16, ColorType::Rgb)
        .context("encoding JPEG")?;
    Ok(out)
}

/// Draws one image of the class `sig` (RGB, row-major) with variation from `rng`.
fn draw(sig: &ClassSignature, size: u32, rng: &mut ChaCha8Rng) -> (u32, u32, Vec<u8>) {
    let side =
        |rng: &mut ChaCha8Rng| ((size as f32) * rng.gen_range(0.75..1.25)).round().max(8.0) as u32;
    let (width, height) = (side(rng), side(rng));
    let (w, h) = (width as f32, height as f32);
    let short = w.min(h);

    // Object: a rotated ellipse covering roughly 30-80% of the image.
    let (cx, cy) = (w * rng.gen_range(0.38..0.62), h * rng.gen_range(0.38..0.62));
    let (rx, ry) = (w * rng.gen_range(0.32..0.5), h * rng.gen_range(0.32..0.5));
    let (es, ec) = rng.gen_range(0.0..PI).sin_cos();

    // Pattern: class angle and period, jittered; random phase.
    let angle = sig.angle + rng.gen_range(-0.2..0.2);
    let (ps, pc) = angle.sin_cos();
    let period = sig.period * short * rng.gen_range(0.8..1.25);
    let (phase_u, phase_v) = (rng.gen::<f32>(), rng.gen::<f32>());
    let extent = rx.max(ry);

    // Colours: class colours with small hue-free jitter per channel, and brightness.
    let brightness = rng.gen_range(0.78..1.18);
    let mut jitter = |c: [f32; 3]| c.map(|x| (x + rng.gen_range(-0.06..0.06)).clamp(0.0, 1.0));
    let (fg, bg) = (jitter(sig.fg), jitter(sig.bg));

    // Background: a muted random colour with a smooth random ripple.
    let back = hsv_to_rgb(rng.gen(), rng.gen_range(0.0..0.35), rng.gen_range(0.2..0.8));
    let ripple_dir = rng.gen_range(0.0..TAU);
    let ripple_freq = rng.gen_range(0.5..2.0) / short;
    let ripple_amp = rng.gen_range(0.0..0.12);

    // Distractor: half the images get a disc or square of a random colour.
    let distractor = rng.gen_bool(0.5).then(|| {
        (
            rng.gen_bool(0.5),
            w * rng.gen::<f32>(),
            h * rng.gen::<f32>(),
            short * rng.gen_range(0.06..0.15),
            hsv_to_rgb(rng.gen(), rng.gen_range(0.3..1.0), rng.gen_range(0.3..1.0)),
        )
    });
    let noise = rng.gen_range(0.015..0.06);

    let mut out = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let (dx, dy) = (px - cx, py - cy);
            // Ellipse membership with a soft 1.5 px edge.
            let ex = (dx * ec + dy * es) / rx;
            let ey = (-dx * es + dy * ec) / ry;
            let r = (ex * ex + ey * ey).sqrt();
            let inside = smoothstep(1.0 + 1.5 / short, 1.0 - 1.5 / short, r);

            let mut c = [0.0f32; 3];
            let t = (px * ripple_dir.cos() + py * ripple_dir.sin()) * ripple_freq * TAU;
            let b = 1.0 + ripple_amp * t.sin();
            for k in 0..3 {
                c[k] = back[k] * b;
            }
            if inside > 0.0 {
                let along = dx * pc + dy * ps;
                let across = -dx * ps + dy * pc;
                let m = if sig.pattern == Pattern::Gradient {
                    sig.pattern.weight(along / extent, 0.0, r)
                } else {
                    sig.pattern
                        .weight(along / period + phase_u, across / period + phase_v, r)
                };
                for k in 0..3 {
                    let obj = bg[k] + (fg[k] - bg[k]) * m;
                    c[k] += (obj - c[k]) * inside;
                }
            }
            if let Some((disc, ox, oy, rad, col)) = distractor {
                let hit = if disc {
                    (px - ox).hypot(py - oy) < rad
                } else {
                    (px - ox).abs() < rad && (py - oy).abs() < rad
                };
                if hit {
                    c = col;
                }
            }
            for v in c {
                let v = v * brightness + rng.gen_range(-noise..noise);
                out.push((v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8);
            }
        }
    }
    (width, height, out)
}

fn smoothstep(edge0: f32, edge1: f32, x: f32) -> f32 {
    let t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// HSV (all 0..1) to RGB (0..1).
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h6 = (h - h.floor()) * 6.0;
    let f = h6 - h6.floor();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match h6 as u32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

// ---------------------------------------------------------------------------------------
// CLI

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Folder to create (must not exist or be empty).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Training images per class.
    #[arg(long, default_value_t = 100)]
    pub train_per_class: usize,
    /// Validation images per class (in val/<wnid>/).
    #[arg(long, default_value_t = 20)]
    pub val_per_class: usize,
    /// Nominal image side; each side is drawn from 0.75..1.25 of it.
    #[arg(long, default_value_t = 96)]
    pub size: u32,
    /// Seed of the per-image variation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let opts = SynthOptions {
        output: args.output,
        classes: args.classes,
        train_per_class: args.train_per_class,
        val_per_class: args.val_per_class,
        size: args.size,
        seed: args.seed,
        ..Default::default()
    };
    let s = generate(&opts)?;
    println!(
        "wrote {} train and {} val images of {} classes ({}) to {}",
        s.train_images,
        s.val_images,
        s.wnids.len(),
        format_bytes(s.bytes),
        s.root.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wnids_and_names() {
        assert_eq!(wnid(0), "n90000000");
        assert_eq!(wnid(7), "n90000007");
        assert_eq!(wnid(123), "n90000123");
        let names: std::collections::HashSet<_> = (0..100).map(class_name).collect();
        assert_eq!(names.len(), 100);
    }

    #[test]
    fn first_classes_differ_in_colour() {
        // Any two of the first 10 classes differ in foreground hue or in pattern.
        for a in 0..10 {
            for b in a + 1..10 {
                let (sa, sb) = (class_signature(a), class_signature(b));
                let dh = (sa.fg_hue - sb.fg_hue).abs();
                let dh = dh.min(1.0 - dh);
                assert!(dh > 0.05 || sa.pattern != sb.pattern, "classes {a} and {b}");
            }
        }
    }

    #[test]
    fn hsv() {
        assert_eq!(hsv_to_rgb(0.0, 1.0, 1.0), [1.0, 0.0, 0.0]);
        assert_eq!(hsv_to_rgb(0.0, 0.0, 0.5), [0.5, 0.5, 0.5]);
    }
}
