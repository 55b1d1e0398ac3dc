//! Dynamic loss scaling for fp16 training, as PyTorch's GradScaler: the loss is multiplied
//! by `scale` before backward; a step whose gradients hold inf/NaN is skipped and the scale
//! multiplied by `backoff_factor`; after `growth_interval` good steps in a row it is
//! multiplied by `growth_factor`.
//!
//! [`DeviceScaler`] keeps the scale, the good-step count and the found-inf flag on the
//! device and updates them there (libtorch's `_amp_foreach_non_finite_check_and_unscale_`
//! and `_amp_update_scale_`), so no step waits for the GPU; [`LossScaler`] is its host
//! record in checkpoints.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The scaler's state as checkpoints store it.
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
}

/// The loss scaler on the device. Disabled (fp32), the scale stays 1 and non-finite steps
/// are still skipped.
pub struct DeviceScaler {
    enabled: bool,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: u64,
    /// f32, one element.
    scale: Tensor,
    /// i32, one element: good steps since the last change.
    growth_tracker: Tensor,
    /// f32, one element: 1 when the last checked gradients held inf/NaN.
    found_inf: Tensor,
    /// f32, one element: skipped steps in all.
    skipped: Tensor,
}

impl DeviceScaler {
    pub fn new(host: &LossScaler, device: Device) -> anyhow::Result<Self> {
        let scalar = |v: f64, kind: Kind| Tensor::f_full([], v, (kind, device));
        Ok(Self {
            enabled: host.enabled,
            growth_factor: host.growth_factor,
            backoff_factor: host.backoff_factor,
            growth_interval: host.growth_interval,
            scale: scalar(host.scale, Kind::Float)?,
            growth_tracker: scalar(host.good_steps as f64, Kind::Int)?,
            found_inf: scalar(0.0, Kind::Float)?,
            skipped: scalar(host.skipped_steps as f64, Kind::Float)?,
        })
    }

    /// The factor the loss is multiplied by before backward.
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// 1 when the gradients of the step in progress hold inf/NaN (after [`Self::unscale`]).
    pub fn found_inf(&self) -> &Tensor {
        &self.found_inf
    }

    /// Divides the gradients by the scale and sets the found-inf flag, in one pass.
    pub fn unscale(&mut self, grads: &Tensor) -> anyhow::Result<()> {
        let _ = self.found_inf.f_zero_()?;
        let inv = self.scale.f_reciprocal()?;
        crate::torch_ext::non_finite_check_and_unscale(&[grads], &self.found_inf, &inv)
    }

    /// After the (possibly skipped) optimizer step: counts a skip, backs the scale off or
    /// grows it.
    pub fn update(&mut self) -> anyhow::Result<()> {
        let _ = self.skipped.f_add_(&self.found_inf)?;
        if self.enabled {
            let _ = self.scale.f_internal_amp_update_scale_(
                &self.growth_tracker,
                &self.found_inf,
                self.growth_factor,
                self.backoff_factor,
                self.growth_interval as i64,
            )?;
        }
        Ok(())
    }

    /// The state for a checkpoint (waits for the device).
    pub fn to_host(&self) -> anyhow::Result<LossScaler> {
        let read = |t: &Tensor| t.f_double_value(&[]).context("reading the loss scaler");
        Ok(LossScaler {
            enabled: self.enabled,
            scale: read(&self.scale)?,
            growth_factor: self.growth_factor,
            backoff_factor: self.backoff_factor,
            growth_interval: self.growth_interval,
            good_steps: read(&self.growth_tracker)? as u64,
            skipped_steps: read(&self.skipped)? as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step with gradients `g` (already multiplied by the scale); whether it was taken.
    fn step(s: &mut DeviceScaler, g: f32) -> anyhow::Result<bool> {
        let grads = Tensor::from_slice(&[g, 1.0]);
        s.unscale(&grads)?;
        let taken = s.found_inf().double_value(&[]) == 0.0;
        s.update()?;
        Ok(taken)
    }

    #[test]
    fn skips_and_backs_off_on_inf_then_grows() -> anyhow::Result<()> {
        let mut host = LossScaler::new(true);
        host.growth_interval = 3;
        let mut s = DeviceScaler::new(&host, Device::Cpu)?;
        assert!(!step(&mut s, f32::INFINITY)?);
        let h = s.to_host()?;
        assert_eq!((h.scale, h.skipped_steps), (32768.0, 1));
        assert!(step(&mut s, 1.0)? && step(&mut s, 1.0)?);
        assert_eq!(s.to_host()?.scale, 32768.0);
        assert!(step(&mut s, 1.0)?);
        let h = s.to_host()?;
        assert_eq!((h.scale, h.good_steps), (65536.0, 0));
        assert!(step(&mut s, 1.0)?);
        assert!(!step(&mut s, f32::NAN)?);
        let h = s.to_host()?;
        assert_eq!((h.scale, h.good_steps, h.skipped_steps), (32768.0, 0, 2));
        // The gradients come back divided by the scale.
        let grads = Tensor::from_slice(&[32768.0f32]);
        s.unscale(&grads)?;
        assert_eq!(grads.double_value(&[0]), 1.0);
        Ok(())
    }

    #[test]
    fn a_checkpointed_scaler_resumes_where_it_was() -> anyhow::Result<()> {
        let mut host = LossScaler::new(true);
        host.good_steps = 7;
        host.skipped_steps = 2;
        host.scale = 1024.0;
        assert_eq!(DeviceScaler::new(&host, Device::Cpu)?.to_host()?, host);
        Ok(())
    }

    #[test]
    fn disabled_scaler_keeps_scale_one_and_still_refuses_non_finite_steps() -> anyhow::Result<()> {
        let mut s = DeviceScaler::new(&LossScaler::new(false), Device::Cpu)?;
        assert!(step(&mut s, 1.0)?);
        assert!(!step(&mut s, f32::INFINITY)?);
        let h = s.to_host()?;
        assert_eq!((h.scale, h.skipped_steps), (1.0, 1));
        Ok(())
    }
}
