//! Dynamic loss scaling for fp16 training (as PyTorch's GradScaler): the loss is multiplied
//! by `scale` before backward; a step whose gradients hold inf/NaN is skipped and the scale
//! halved; after `growth_interval` good steps in a row the scale doubles.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub enabled: bool,
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
    /// Good steps since the last change.
    pub good_steps: u64,
    pub skipped_steps: u64,
}

impl LossScaler {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            scale: if enabled { 65536.0 } else { 1.0 },
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            good_steps: 0,
            skipped_steps: 0,
        }
    }

    /// Records one step's outcome; returns whether the optimizer step should be taken.
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if !self.enabled {
            return grads_finite;
        }
        if !grads_finite {
            self.scale = (self.scale * self.backoff_factor).max(1.0);
            self.good_steps = 0;
            self.skipped_steps += 1;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale *= self.growth_factor;
            self.good_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_and_backs_off_on_inf_then_grows() {
        let mut s = LossScaler::new(true);
        s.growth_interval = 3;
        assert!(!s.update(false));
        assert_eq!((s.scale, s.skipped_steps), (32768.0, 1));
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        assert!(s.update(true));
        assert!(!s.update(false));
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    }

    #[test]
    fn disabled_scaler_keeps_scale_one_and_still_refuses_non_finite_steps() {
        let mut s = LossScaler::new(false);
        assert!(s.update(true));
        assert!(!s.update(false));
        assert_eq!(s.scale, 1.0);
    }
}
