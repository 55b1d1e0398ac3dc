//! The records of a run's `log.jsonl`, one JSON object per line (DLLogger style), tagged
//! by `type`. The trainer writes them and `convnets plot` (and the log truncation of a
//! resumed run) reads them through these types; `scripts/gpu_scaling.py` reads the `epoch`
//! records' `img_s` and `boundary_s`.
//!
//! Readers are lenient where older or hand-made logs may differ: records of another `type`
//! are [`LogRecord::Other`], unknown keys are ignored, and figures that may be missing (or
//! `null`, which is how JSON writes a NaN loss) are `Option`s.

use serde::{Deserialize, Serialize};

use super::LoaderKind;

/// One line of `log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LogRecord {
    /// What `--loader auto` chose, and why (once per start).
    Loader(LoaderChoice),
    /// A window of training steps, at a logging point.
    Train(StepWindow),
    /// An evaluation on the val split at the end of an epoch.
    Eval(EvalRecord),
    /// A whole epoch: its rate over its wall time, boundary included.
    Epoch(EpochRecord),
    /// A record of another type: skipped by readers.
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderChoice {
    pub step: u64,
    pub loader: LoaderKind,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepWindow {
    #[serde(default)]
    pub epoch: u64,
    /// Steps done so far, this window's last included.
    pub step: u64,
    /// Mean loss over the window and the ranks (`None`: not finite).
    #[serde(default)]
    pub loss: Option<f64>,
    #[serde(default)]
    pub lr: Option<f64>,
    /// Images per second over the window, all ranks together.
    #[serde(default)]
    pub img_s: Option<f64>,
    #[serde(default)]
    pub loss_scale: Option<f64>,
    /// Steps skipped so far for a non-finite gradient.
    #[serde(default)]
    pub skipped_steps: Option<u64>,
    /// Records replaced so far under `--on-bad-record skip`.
    #[serde(default)]
    pub skipped_records: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub epoch: u64,
    #[serde(default)]
    pub step: Option<u64>,
    #[serde(default)]
    pub loss: Option<f64>,
    /// Fractions (0..1).
    #[serde(default)]
    pub top1: Option<f64>,
    #[serde(default)]
    pub top5: Option<f64>,
    #[serde(default)]
    pub images: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub step: u64,
    /// Images of the epoch, all ranks together.
    pub images: u64,
    pub wall_s: f64,
    pub img_s: f64,
    /// What the epoch's end took: evaluation, checkpoint snapshot, the loader's turn.
    pub boundary_s: f64,
}

impl LogRecord {
    /// The step the record was written at, when it has one.
    pub fn step(&self) -> Option<u64> {
        match self {
            Self::Loader(r) => Some(r.step),
            Self::Train(r) => Some(r.step),
            Self::Eval(r) => r.step,
            Self::Epoch(r) => Some(r.step),
            Self::Other => None,
        }
    }

    /// Parses one line: `Ok(None)` for a blank line or an object without a `type`.
    pub fn parse(line: &str) -> anyhow::Result<Option<Self>> {
        use anyhow::{bail, Context};
        let line = line.trim();
        if line.is_empty() {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_str(line).context("not valid JSON")?;
        let Some(obj) = value.as_object() else {
            bail!("not a JSON object");
        };
        if !obj.contains_key("type") {
            return Ok(None);
        }
        serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|e| {
                // serde does not say which field: the one without which the record parses.
                let culprit = obj.keys().filter(|k| *k != "type").find(|k| {
                    let mut rest = obj.clone();
                    rest.remove(*k);
                    serde_json::from_value::<Self>(serde_json::Value::Object(rest)).is_ok()
                });
                match culprit {
                    Some(key) => anyhow::anyhow!("{key:?}: {e}"),
                    None => e.into(),
                }
            })
    }

    /// The record as one line of JSON (without the newline).
    pub fn to_line(&self) -> anyhow::Result<String> {
        Ok(serde_json::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_their_type_tags_and_field_names() -> anyhow::Result<()> {
        let epoch = LogRecord::Epoch(EpochRecord {
            epoch: 2,
            step: 30,
            images: 480,
            wall_s: 2.0,
            img_s: 240.0,
            boundary_s: 0.5,
        });
        let line = epoch.to_line()?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        assert_eq!(v["type"], "epoch");
        assert_eq!(
            (v["img_s"].as_f64(), v["boundary_s"].as_f64()),
            (Some(240.0), Some(0.5))
        );
        assert_eq!(LogRecord::parse(&line)?, Some(epoch));

        // A NaN loss is written as null and read back as no loss.
        let train = LogRecord::Train(StepWindow {
            step: 4,
            loss: Some(f64::NAN),
            lr: Some(0.1),
            ..StepWindow::default()
        });
        let line = train.to_line()?;
        assert!(line.starts_with("{\"type\":\"train\"") && line.contains("\"loss\":null"));
        let LogRecord::Train(back) = LogRecord::parse(&line)?.expect("a record") else {
            panic!("not a train record: {line}");
        };
        assert_eq!((back.step, back.loss), (4, None));

        // Other types and typeless objects are not errors.
        assert_eq!(
            LogRecord::parse("{\"type\":\"meta\",\"arch\":\"resnet18\"}")?,
            Some(LogRecord::Other)
        );
        assert_eq!(LogRecord::parse("{\"step\":3}")?, None);
        assert!(LogRecord::parse("{\"type\":\"train\",\"step\":\"x\"}").is_err());
        let e = LogRecord::parse("{\"type\":\"eval\",\"epoch\":0,\"top1\":\"high\"}")
            .expect_err("top1 is not a number");
        assert!(format!("{e:#}").contains("top1"), "{e:#}");
        Ok(())
    }
}
