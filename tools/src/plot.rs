//! `convnets plot`: training curves of a run folder as one PNG.
//!
//! Reads `RUN_DIR/log.jsonl` through the trainer's record types (`train::log`):
//! `{"type":"train","epoch":E,"step":S,"loss":L,"lr":X,"img_s":Y,...}` and
//! `{"type":"eval","epoch":E,"step":S,"loss":L,"top1":A,"top5":B}`; other types and
//! unknown keys are ignored. Draws three panels: loss vs step (train, and eval where it has
//! a step), eval top-1/top-5 vs epoch, throughput vs step. Text is drawn with an embedded
//! DejaVu Sans through ab_glyph, so no system font libraries are needed.

use std::path::PathBuf;
use std::sync::Once;

use anyhow::{bail, Context};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use crate::train::log::LogRecord;

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run folder holding log.jsonl.
    pub run_dir: PathBuf,
    /// PNG to write (default RUN_DIR/curves.png).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    let log_path = args.run_dir.join("log.jsonl");
    let text = std::fs::read_to_string(&log_path)
        .with_context(|| format!("reading {}", log_path.display()))?;
    let log = parse_log(&text).with_context(|| format!("in {}", log_path.display()))?;
    if log.train.is_empty() && log.eval.is_empty() {
        bail!("{} has no train or eval records", log_path.display());
    }
    let png = render(&log, &args.run_dir.display().to_string())?;
    let out = args
        .output
        .unwrap_or_else(|| args.run_dir.join("curves.png"));
    convnets_formats::atomic::write_atomic(&out, &png)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} train and {} eval records)",
        out.display(),
        log.train.len(),
        log.eval.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The log

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainPoint {
    pub step: f64,
    pub loss: Option<f64>,
    pub img_s: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalPoint {
    pub epoch: f64,
    pub step: Option<f64>,
    pub loss: Option<f64>,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunLog {
    pub train: Vec<TrainPoint>,
    pub eval: Vec<EvalPoint>,
}

/// Parses log.jsonl text (through the trainer's own record types). Blank lines, other
/// record types and unknown keys are skipped; a line that is not a JSON object, or a
/// train/eval record whose fields have the wrong type (or lacks its `step`/`epoch`), is an
/// error naming the line (1-based).
pub fn parse_log(text: &str) -> anyhow::Result<RunLog> {
    let mut log = RunLog::default();
    for (i, line) in text.lines().enumerate() {
        let record = LogRecord::parse(line).with_context(|| format!("line {}", i + 1))?;
        match record {
            Some(LogRecord::Train(r)) => log.train.push(TrainPoint {
                step: r.step as f64,
                loss: finite(r.loss),
                img_s: finite(r.img_s),
            }),
            Some(LogRecord::Eval(r)) => log.eval.push(EvalPoint {
                epoch: r.epoch as f64,
                step: r.step.map(|s| s as f64),
                loss: finite(r.loss),
                top1: finite(r.top1),
                top5: finite(r.top5),
            }),
            _ => {}
        }
    }
    Ok(log)
}

fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|x| x.is_finite())
}

// ---------------------------------------------------------------------------------------
// Drawing

const WIDTH: u32 = 1000;
const PANEL_HEIGHT: u32 = 340;
const TITLE_HEIGHT: u32 = 36;
const FONT: &str = "sans-serif";

static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_fonts() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        if register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_err() {
            result = Err(anyhow::anyhow!(
                "the embedded DejaVu Sans font does not parse"
            ));
        }
    });
    result
}

struct Series {
    label: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    markers: bool,
}

impl Series {
    /// Points sorted by x; of repeated x (a resumed run logs steps again) the last wins.
    fn new(label: &'static str, color: RGBColor, markers: bool, points: Vec<(f64, f64)>) -> Self {
        let mut points: Vec<(usize, (f64, f64))> = points.into_iter().enumerate().collect();
        points.sort_by(|a, b| a.1 .0.total_cmp(&b.1 .0).then(a.0.cmp(&b.0)));
        let mut out: Vec<(f64, f64)> = Vec::with_capacity(points.len());
        for (_, p) in points {
            match out.last_mut() {
                Some(last) if last.0 == p.0 => *last = p,
                _ => out.push(p),
            }
        }
        Self {
            label,
            color,
            points: out,
            markers,
        }
    }
}

/// Draws the three panels into an RGB buffer and encodes it as PNG.
pub fn render(log: &RunLog, title: &str) -> anyhow::Result<Vec<u8>> {
    register_fonts()?;
    let height = TITLE_HEIGHT + 3 * PANEL_HEIGHT;
    let mut rgb = vec![0u8; (WIDTH * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, rest) = root.split_vertically(TITLE_HEIGHT);
        top.titled(title, (FONT, 22))?;
        let panels = rest.split_evenly((3, 1));

        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        let green = RGBColor(44, 160, 44);

        let train_loss = log
            .train
            .iter()
            .filter_map(|p| Some((p.step, p.loss?)))
            .collect();
        let eval_loss = log
            .eval
            .iter()
            .filter_map(|p| Some((p.step?, p.loss?)))
            .collect();
        panel(
            &panels[0],
            "Loss",
            "step",
            "loss",
            &[
                Series::new("train", blue, false, train_loss),
                Series::new("eval", orange, true, eval_loss),
            ],
            None,
            "no train loss or eval loss records",
        )?;

        // Shown in percent; the log may hold fractions (0..1, as `train` writes) or percent.
        let max_acc = log
            .eval
            .iter()
            .flat_map(|p| [p.top1, p.top5])
            .flatten()
            .fold(0.0, f64::max);
        let scale = if max_acc <= 1.0 { 100.0 } else { 1.0 };
        let top1 = log
            .eval
            .iter()
            .filter_map(|p| Some((p.epoch, p.top1? * scale)))
            .collect();
        let top5 = log
            .eval
            .iter()
            .filter_map(|p| Some((p.epoch, p.top5? * scale)))
            .collect();
        panel(
            &panels[1],
            "Eval accuracy",
            "epoch",
            "accuracy (%)",
            &[
                Series::new("top-1", blue, true, top1),
                Series::new("top-5", green, true, top5),
            ],
            Some(0.0..100.0),
            "no eval records",
        )?;

        let img_s = log
            .train
            .iter()
            .filter_map(|p| Some((p.step, p.img_s?)))
            .collect();
        panel(
            &panels[2],
            "Training throughput",
            "step",
            "images/s",
            &[Series::new("img/s", blue, false, img_s)],
            None,
            "no throughput records",
        )?;
        root.present()?;
    }
    let image = image::RgbImage::from_raw(WIDTH, height, rgb).context("plot buffer size")?;
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .context("encoding PNG")?;
    Ok(png.into_inner())
}

/// One chart; `y_fixed` pins the y range (accuracy), otherwise it fits the data.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    y_fixed: Option<std::ops::Range<f64>>,
    empty_note: &str,
) -> anyhow::Result<()> {
    let all = || series.iter().flat_map(|s| s.points.iter().copied());
    let empty = all().next().is_none();
    let x_range = padded(all().map(|p| p.0), 0.0, 1.0);
    let rising = y_fixed.is_some();
    let y_range = y_fixed.unwrap_or_else(|| padded(all().map(|p| p.1), 0.05, 1.0));

    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 18))
        .margin(12)
        .margin_right(28)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(RGBColor(235, 235, 235))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .draw()?;
    if empty {
        let (w, h) = area.dim_in_pixel();
        let style = TextStyle::from((FONT, 16))
            .color(&RGBColor(120, 120, 120))
            .pos(Pos::new(HPos::Center, VPos::Center));
        area.draw_text(empty_note, &style, (w as i32 / 2, h as i32 / 2))?;
        return Ok(());
    }
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if s.markers {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if series.iter().filter(|s| !s.points.is_empty()).count() < 2 {
        return Ok(()); // the caption says what a lone curve is
    }
    chart
        .configure_series_labels()
        // Losses fall and accuracies rise: keep the legend out of the curves' way.
        .position(if rising {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        })
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    Ok(())
}

/// A tick label: integers without decimals, others with at most 3 significant decimals.
fn tick(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The range of `values` widened by `pad` of its span on each side; a single value (or
/// none) gets a range of `min_span` around it.
fn padded(values: impl Iterator<Item = f64>, pad: f64, min_span: f64) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return 0.0..min_span;
    }
    let span = hi - lo;
    if span <= f64::EPSILON * hi.abs().max(1.0) {
        let half = (lo.abs() * 0.1).max(min_span / 2.0);
        return (lo - half)..(hi + half);
    }
    (lo - span * pad)..(hi + span * pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_ignores() -> anyhow::Result<()> {
        let log = parse_log(
            "{\"type\":\"train\",\"epoch\":0,\"step\":1,\"loss\":2.5,\"lr\":0.1,\"img_s\":900,\"x\":[1]}\n\
             \n\
             {\"type\":\"meta\",\"arch\":\"resnet18\"}\n\
             {\"type\":\"eval\",\"epoch\":0,\"step\":10,\"loss\":2.0,\"top1\":0.3,\"top5\":0.8}\n\
             {\"type\":\"train\",\"epoch\":0,\"step\":2,\"loss\":null}\n",
        )?;
        assert_eq!(log.train.len(), 2);
        assert_eq!(log.train[0].img_s, Some(900.0));
        assert_eq!(log.train[1].loss, None);
        assert_eq!(log.eval[0].top5, Some(0.8));
        Ok(())
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse_log("{\"type\":\"train\",\"step\":1}\n{oops\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
        let e = parse_log("{\"type\":\"train\",\"step\":1,\"loss\":\"x\"}\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
        let e = parse_log("[1,2]\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
    }

    #[test]
    fn series_sorted_last_wins() {
        let s = Series::new("a", BLACK, false, vec![(2.0, 1.0), (1.0, 5.0), (2.0, 3.0)]);
        assert_eq!(s.points, vec![(1.0, 5.0), (2.0, 3.0)]);
    }
}
