//! SGD with momentum (and optional Nesterov) over two parameter groups: weight decay on
//! conv/linear weights, none on BN parameters and biases (every 1-D parameter), as the
//! seed's recipe says. Written here rather than taken from tch so that the momentum
//! buffers can be saved and restored for exact resume.

use std::collections::HashMap;

use anyhow::{bail, Context};
use tch::{nn::VarStore, Tensor};

pub struct Sgd {
    /// (name, parameter, decays) in a fixed order.
    params: Vec<(String, Tensor, bool)>,
    momentum_buffers: Vec<Option<Tensor>>,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Sgd {
    pub fn new(vs: &VarStore, momentum: f64, weight_decay: f64, nesterov: bool) -> Self {
        // Trainable variables are exactly those that require grad (BN running statistics
        // and counters do not).
        let mut params: Vec<(String, Tensor, bool)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, t)| {
                let decays = t.dim() > 1;
                (name, t, decays)
            })
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let n = params.len();
        Self {
            params,
            momentum_buffers: (0..n).map(|_| None).collect(),
            momentum,
            weight_decay,
            nesterov,
        }
    }

    /// Names of the parameters with and without weight decay.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let mut decay = Vec::new();
        let mut no_decay = Vec::new();
        for (name, _, d) in &self.params {
            if *d { decay.push(name.as_str()) } else { no_decay.push(name.as_str()) }
        }
        (decay, no_decay)
    }

    pub fn zero_grad(&mut self) {
        for (_, p, _) in &mut self.params {
            p.zero_grad();
        }
    }

    /// True when every gradient is finite (one reduction per parameter, one sync).
    pub fn grads_finite(&self) -> bool {
        let sums: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p, _)| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.sum(tch::Kind::Float))
            .collect();
        if sums.is_empty() {
            return true;
        }
        Tensor::stack(&sums, 0).isfinite().all().int64_value(&[]) != 0
    }

    /// One update with learning rate `lr`; gradients are first multiplied by `grad_scale`
    /// (the inverse of the loss scale).
    pub fn step(&mut self, lr: f64, grad_scale: f64) {
        let _guard = tch::no_grad_guard();
        for ((_, p, decays), buf) in self.params.iter_mut().zip(&mut self.momentum_buffers) {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let mut d = if grad_scale != 1.0 { &g * grad_scale } else { g };
            if *decays && self.weight_decay != 0.0 {
                d += &*p * self.weight_decay;
            }
            if self.momentum != 0.0 {
                let b = match buf {
                    Some(b) => {
                        *b *= self.momentum;
                        *b += &d;
                        b
                    }
                    None => buf.insert(d.detach().copy()),
                };
                d = if self.nesterov { d + &*b * self.momentum } else { b.shallow_clone() };
            }
            *p -= d * lr;
        }
    }

    /// Momentum buffers by parameter name, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.momentum_buffers)
            .filter_map(|((name, _, _), b)| b.as_ref().map(|b| (name.clone(), b.to_device(tch::Device::Cpu))))
            .collect()
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        for ((name, p, _), buf) in self.params.iter().zip(&mut self.momentum_buffers) {
            *buf = match state.get(name) {
                Some(t) if t.size() == p.size() => Some(t.to_device(p.device()).to_kind(p.kind())),
                Some(t) => bail!("momentum buffer {name} has shape {:?}, parameter {:?}", t.size(), p.size()),
                None => None,
            };
        }
        if let Some(extra) = state.keys().find(|k| !self.params.iter().any(|(n, _, _)| n == *k)) {
            bail!("momentum buffer for unknown parameter {extra}");
        }
        Ok(())
    }

    pub fn save(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let state = self.state();
        let tmp = convnets_formats::atomic::temp_path(path);
        Tensor::write_safetensors(&state, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    #[test]
    fn no_weight_decay_on_bn_and_bias() {
        let vs = VarStore::new(Device::Cpu);
        let cfg = convnets_models::ModelConfig::default();
        convnets_models::registry::build("resnet18", &vs.root(), 10, &cfg).unwrap();
        let sgd = Sgd::new(&vs, 0.875, 3.0517578125e-05, false);
        let (decay, no_decay) = sgd.groups();
        assert!(decay.iter().all(|n| n.ends_with("weight") && !n.contains("bn") && !n.contains("downsample.1")));
        assert!(no_decay.contains(&"fc.bias") && no_decay.contains(&"bn1.weight") && no_decay.contains(&"layer1.0.bn2.bias"));
        assert!(decay.contains(&"fc.weight") && decay.contains(&"conv1.weight"));
        assert!(!decay.iter().any(|n| n.contains("running")));
        assert_eq!(decay.len() + no_decay.len(), vs.trainable_variables().len());
    }

    #[test]
    fn matches_hand_computed_momentum_steps() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2, 2], nn::Init::Const(1.0));
        let b = vs.root().var("b", &[2], nn::Init::Const(1.0));
        let mut sgd = Sgd::new(&vs, 0.5, 0.1, false);
        for _ in 0..2 {
            sgd.zero_grad();
            (w.sum(Kind::Float) + b.sum(Kind::Float)).backward();
            sgd.step(0.1, 1.0);
        }
        // w: g = 1 + 0.1 w. Step 1: buf = 1.1, w = 0.89. Step 2: d = 1.089, buf = 0.55 + 1.089.
        let w1 = 1.0 - 0.1 * 1.1;
        let w2 = w1 - 0.1 * (0.5 * 1.1 + (1.0 + 0.1 * w1));
        assert!((w.double_value(&[0, 0]) - w2).abs() < 1e-6);
        // b has no decay: buf = 1, then 1.5.
        assert!((b.double_value(&[0]) - (1.0 - 0.1 - 0.15)).abs() < 1e-6);
    }
}
