//! Learning-rate schedules, as functions of the (fractional) epoch so that every step gets
//! its own value: linear warm-up from 0, then cosine to 0, step decay, or linear to 0.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ScheduleKind {
    Cosine,
    /// Multiply by `gamma` at each milestone epoch.
    Step {
        milestones: Vec<f64>,
        gamma: f64,
    },
    Linear,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_epochs: f64,
    pub epochs: f64,
    pub kind: ScheduleKind,
}

impl LrSchedule {
    /// The learning rate at fractional epoch `t` (epoch + step / steps_per_epoch).
    pub fn lr(&self, t: f64) -> f64 {
        if t < self.warmup_epochs {
            return self.base_lr * t / self.warmup_epochs;
        }
        let span = (self.epochs - self.warmup_epochs).max(f64::MIN_POSITIVE);
        let done = ((t - self.warmup_epochs) / span).clamp(0.0, 1.0);
        match &self.kind {
            ScheduleKind::Cosine => {
                0.5 * (1.0 + (std::f64::consts::PI * done).cos()) * self.base_lr
            }
            ScheduleKind::Linear => (1.0 - done) * self.base_lr,
            ScheduleKind::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| t >= m).count() as i32;
                self.base_lr * gamma.powi(passed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn values_against_hand_computed_ones() {
        let s = LrSchedule {
            base_lr: 0.256,
            warmup_epochs: 2.0,
            epochs: 10.0,
            kind: ScheduleKind::Cosine,
        };
        close(s.lr(0.0), 0.0);
        close(s.lr(1.0), 0.128);
        close(s.lr(2.0), 0.256);
        close(s.lr(6.0), 0.128); // half way through the cosine
        close(s.lr(10.0), 0.0);
        close(
            s.lr(4.0),
            0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()) * 0.256,
        );
        let s = LrSchedule {
            base_lr: 0.1,
            warmup_epochs: 0.0,
            epochs: 90.0,
            kind: ScheduleKind::Step {
                milestones: vec![30.0, 60.0, 80.0],
                gamma: 0.1,
            },
        };
        close(s.lr(29.9), 0.1);
        close(s.lr(30.0), 0.01);
        close(s.lr(85.0), 0.0001);
        let s = LrSchedule {
            base_lr: 1.0,
            warmup_epochs: 0.0,
            epochs: 4.0,
            kind: ScheduleKind::Linear,
        };
        close(s.lr(1.0), 0.75);
    }
}
