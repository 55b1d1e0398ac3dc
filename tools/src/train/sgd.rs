//! SGD with momentum (and optional Nesterov) over two parameter groups: weight decay on
//! conv/linear weights, none on BN parameters and biases (every 1-D parameter), as the
//! seed's recipe says. Across these, the classifier (`fc.*`) and the backbone are two LR
//! groups, so fine-tuning can train the backbone at a fraction of the LR.
//!
//! All parameters, their gradients and the momentum live in three flat buffers: each
//! parameter (and, from the first backward on, its gradient) is re-pointed at a view of its
//! slice with its own strides (channels_last included), so autograd accumulates straight
//! into the flat gradient and one update is a handful of kernels over the whole model
//! instead of several per parameter (what PyTorch's foreach/fused SGD achieve). The order
//! is decayed backbone, decayed classifier, undecayed classifier, undecayed backbone, so
//! both the decayed group and the classifier are one contiguous range each. Written here
//! rather than taken from tch so that the momentum can be saved and restored for exact
//! resume.

use std::collections::HashMap;

use anyhow::{bail, Context};
use tch::{nn::VarStore, Device, Kind, Tensor};

struct Param {
    name: String,
    tensor: Tensor,
    offset: i64,
    numel: i64,
}

pub struct Sgd {
    params: Vec<Param>,
    /// Elements of the decayed group: `[0, decayed)` of the flat buffers.
    decayed: i64,
    /// Elements of the classifier: `[head.0, head.1)` of the flat buffers.
    head: (i64, i64),
    flat_params: Tensor,
    flat_grads: Tensor,
    /// Whether each parameter's gradient is a view of `flat_grads` yet (after a backward).
    grads_attached: bool,
    momentum_buffer: Option<Tensor>,
    /// Exponential moving average of the parameters: (decay, flat average).
    ema: Option<(f64, Tensor)>,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// The backbone's LR as a multiple of the classifier's (PyTorch's per-group `lr`).
    pub backbone_lr_scale: f64,
}

/// Names of the classifier's parameters (torchvision's and timm's ResNet `fc`).
pub const HEAD_PREFIX: &str = "fc.";

/// Parameters start at multiples of this many elements (64 bytes) in the flat buffers:
/// cuDNN and vectorised kernels read them with wide loads, which fault on a view at an odd
/// offset (a 10-class classifier bias would otherwise misalign every BN parameter after it).
const ALIGN: i64 = 16;

fn aligned(offset: i64) -> i64 {
    (offset + ALIGN - 1) / ALIGN * ALIGN
}

/// Position of a parameter in the flat buffers (see the module docs).
fn group_rank(name: &str, t: &Tensor) -> u8 {
    match (t.dim() > 1, name.starts_with(HEAD_PREFIX)) {
        (true, false) => 0,
        (true, true) => 1,
        (false, true) => 2,
        (false, false) => 3,
    }
}

impl Sgd {
    /// Takes over the trainable variables of `vs`, which must already be on their device.
    pub fn new(
        vs: &VarStore,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
    ) -> anyhow::Result<Self> {
        // Trainable variables are exactly those that require grad (BN running statistics
        // and counters do not).
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| (group_rank(&a.0, &a.1), &a.0).cmp(&(group_rank(&b.0, &b.1), &b.0)));
        let device = vars.first().map_or(Device::Cpu, |(_, t)| t.device());
        // Each parameter starts at a multiple of ALIGN elements; the ranges the update
        // treats alike (decayed or not, classifier or not) are whole aligned blocks, and
        // the padding between them is zero in every buffer (and stays so).
        let mut starts = Vec::with_capacity(vars.len());
        let (mut offset, mut decayed) = (0i64, None);
        let mut head: Option<(i64, i64)> = None;
        for (name, tensor) in &vars {
            offset = aligned(offset);
            if tensor.dim() <= 1 && decayed.is_none() {
                decayed = Some(offset);
            }
            starts.push(offset);
            offset += tensor.numel() as i64;
            if name.starts_with(HEAD_PREFIX) {
                head = Some((
                    head.map_or(starts[starts.len() - 1], |h| h.0),
                    aligned(offset),
                ));
            }
        }
        let total = aligned(offset);
        let decayed = decayed.unwrap_or(total);
        let flat_params = Tensor::zeros([total], (Kind::Float, device));
        let flat_grads = Tensor::zeros([total], (Kind::Float, device));
        let mut params = Vec::with_capacity(vars.len());
        let _guard = tch::no_grad_guard();
        for ((name, mut tensor), offset) in vars.into_iter().zip(starts) {
            if tensor.kind() != Kind::Float || tensor.device() != device {
                bail!(
                    "parameter {name} is {:?} on {:?}; SGD needs fp32 parameters on one device",
                    tensor.kind(),
                    tensor.device()
                );
            }
            let numel = tensor.numel() as i64;
            let mut view = flat_params.as_strided(tensor.size(), tensor.stride(), offset);
            view.copy_(&tensor);
            tensor.set_data(&view);
            params.push(Param {
                name,
                tensor,
                offset,
                numel,
            });
        }
        // No classifier: an empty range at the decay boundary.
        let head = head.unwrap_or((decayed, decayed));
        // Zeros: the first update then sets buf = d, as PyTorch's first step does; a buffer
        // that exists from the start keeps every step (and a captured graph) alike.
        let momentum_buffer = (momentum != 0.0).then(|| flat_params.zeros_like());
        Ok(Self {
            params,
            decayed,
            head,
            flat_params,
            flat_grads,
            grads_attached: false,
            momentum_buffer,
            ema: None,
            momentum,
            weight_decay,
            nesterov,
            backbone_lr_scale: 1.0,
        })
    }

    /// Whether every parameter starts at an aligned offset (for the tests).
    #[cfg(test)]
    fn aligned(&self) -> bool {
        self.params.iter().all(|p| p.offset % ALIGN == 0) && self.decayed % ALIGN == 0
    }

    /// Names of the parameters with and without weight decay.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let (decay, no_decay): (Vec<&Param>, Vec<&Param>) =
            self.params.iter().partition(|p| p.offset < self.decayed);
        (
            decay.iter().map(|p| p.name.as_str()).collect(),
            no_decay.iter().map(|p| p.name.as_str()).collect(),
        )
    }

    fn view(&self, flat: &Tensor, p: &Param) -> Tensor {
        flat.as_strided(p.tensor.size(), p.tensor.stride(), p.offset)
    }

    /// Points every gradient at its slice of the flat buffer (once, after the first
    /// backward has created them); from then on autograd accumulates in place there.
    fn attach_grads(&mut self) {
        if self.grads_attached {
            return;
        }
        let _guard = tch::no_grad_guard();
        for p in &self.params {
            let mut g = p.tensor.grad();
            let mut view = self.view(&self.flat_grads, p);
            if g.defined() {
                view.copy_(&g);
                g.set_data(&view);
            }
        }
        self.grads_attached = self.params.iter().all(|p| p.tensor.grad().defined());
    }

    /// The gradients as one flat buffer (after a backward), e.g. to sum them over ranks
    /// in place.
    pub fn flat_grads(&mut self) -> &Tensor {
        self.attach_grads();
        &self.flat_grads
    }

    /// The state every rank must share: parameters, momentum, moving average.
    pub fn shared_state(&self) -> Vec<Tensor> {
        let mut out = vec![self.flat_params.shallow_clone()];
        out.extend(self.momentum_buffer.as_ref().map(Tensor::shallow_clone));
        out.extend(self.ema.as_ref().map(|(_, e)| e.shallow_clone()));
        out
    }

    pub fn zero_grad(&mut self) {
        if self.grads_attached {
            let _ = self.flat_grads.zero_();
        } else {
            for p in &mut self.params {
                p.tensor.zero_grad();
            }
        }
    }

    /// One update with the learning rate in `lr` (a one-element f32 tensor on the
    /// parameters' device), skipped when `found_inf` holds 1: PyTorch's fused SGD over each
    /// contiguous (weight decay, LR group) range of the flat buffers, then the moving
    /// average. Gradients must already be unscaled. Nothing here waits for the device.
    pub fn step(&mut self, lr: &Tensor, found_inf: &Tensor) -> anyhow::Result<()> {
        self.attach_grads();
        let _guard = tch::no_grad_guard();
        let total = self.flat_params.numel() as i64;
        let backbone_lr = if self.backbone_lr_scale != 1.0 {
            Some(lr.f_mul_scalar(self.backbone_lr_scale)?)
        } else {
            None
        };
        let (h0, h1) = self.head;
        // (start, end, weight decay, classifier?) in flat order; empty ranges are skipped.
        let ranges = [
            (0, h0, self.weight_decay, false),
            (h0, self.decayed, self.weight_decay, true),
            (self.decayed, h1, 0.0, true),
            (h1, total, 0.0, false),
        ];
        let mut merged: Vec<(i64, i64, f64, bool)> = Vec::with_capacity(4);
        for (start, end, wd, head) in ranges {
            if end <= start {
                continue;
            }
            // Without an LR scale the classifier is just more backbone.
            let head = head && backbone_lr.is_some();
            match merged.last_mut() {
                Some(last) if last.1 == start && last.2 == wd && last.3 == head => last.1 = end,
                _ => merged.push((start, end, wd, head)),
            }
        }
        for (start, end, wd, head) in merged {
            let len = end - start;
            let p = self.flat_params.f_narrow(0, start, len)?;
            let g = self.flat_grads.f_narrow(0, start, len)?;
            let b = match &self.momentum_buffer {
                Some(b) => vec![b.f_narrow(0, start, len)?],
                None => Vec::new(),
            };
            let lr = match (&backbone_lr, head) {
                (Some(scaled), false) => scaled,
                _ => lr,
            };
            let bufs: Vec<&Tensor> = b.iter().collect();
            crate::torch_ext::fused_sgd(
                &[&p],
                &[&g],
                &bufs,
                wd,
                self.momentum,
                lr,
                self.nesterov,
                Some(found_inf),
            )?;
        }
        if let Some((decay, ema)) = &mut self.ema {
            // ema = decay * ema + (1 - decay) * params, on taken steps only.
            let weight = found_inf
                .f_neg()?
                .f_add_scalar(1.0)?
                .f_mul_scalar(1.0 - *decay)?;
            let _ = ema.f_lerp_tensor_(&self.flat_params, &weight)?;
        }
        Ok(())
    }

    /// Keeps an exponential moving average of the parameters from now on.
    pub fn enable_ema(&mut self, decay: f64) {
        self.ema = Some((decay, self.flat_params.detach().copy()));
    }

    /// Exchanges the parameters with their moving average (call again to swap back):
    /// evaluation of the averaged weights without a second model.
    pub fn swap_ema(&mut self) {
        if let Some((_, ema)) = &mut self.ema {
            let _guard = tch::no_grad_guard();
            let live = self.flat_params.detach().copy();
            self.flat_params.copy_(ema);
            ema.copy_(&live);
        }
    }

    /// The moving average by parameter name, as views of the device buffer.
    pub fn ema_views(&self) -> Vec<(String, Tensor)> {
        let Some((_, ema)) = &self.ema else {
            return Vec::new();
        };
        self.params
            .iter()
            .map(|p| (p.name.clone(), self.view(ema, p)))
            .collect()
    }

    pub fn load_ema_state(&mut self, state: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let Some((_, ema)) = &self.ema else {
            return Ok(());
        };
        let ema = ema.shallow_clone();
        let _guard = tch::no_grad_guard();
        for p in &self.params {
            let t = state
                .get(&p.name)
                .with_context(|| format!("no moving average for {}", p.name))?;
            if t.size() != p.tensor.size() {
                bail!(
                    "moving average of {} has shape {:?}, parameter {:?}",
                    p.name,
                    t.size(),
                    p.tensor.size()
                );
            }
            self.view(&ema, p).copy_(t);
        }
        Ok(())
    }

    /// Momentum buffers by parameter name, as views of the device buffer.
    pub fn momentum_views(&self) -> Vec<(String, Tensor)> {
        let Some(b) = &self.momentum_buffer else {
            return Vec::new();
        };
        self.params
            .iter()
            .map(|p| (p.name.clone(), self.view(b, p)))
            .collect()
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let Some(buffer) = self.momentum_buffer.as_ref().map(Tensor::shallow_clone) else {
            if let Some(name) = state.keys().next() {
                bail!("momentum buffer for {name}, but this run has no momentum");
            }
            return Ok(());
        };
        if state.is_empty() {
            // Saved before the first step: the buffer is still zero.
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for p in &self.params {
            let t = state
                .get(&p.name)
                .with_context(|| format!("no momentum buffer for {}", p.name))?;
            if t.size() != p.tensor.size() {
                bail!(
                    "momentum buffer {} has shape {:?}, parameter {:?}",
                    p.name,
                    t.size(),
                    p.tensor.size()
                );
            }
            self.view(&buffer, p).copy_(t);
        }
        if let Some(extra) = state
            .keys()
            .find(|k| !self.params.iter().any(|p| &p.name == *k))
        {
            bail!("momentum buffer for unknown parameter {extra}");
        }
        Ok(())
    }

    /// Number of parameter elements.
    pub fn numel(&self) -> i64 {
        self.params.iter().map(|p| p.numel).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, ModuleT};

    /// Unscales by `grad_scale`, then steps; whether the step was taken.
    fn take_step(sgd: &mut Sgd, lr: f64, grad_scale: f64) -> anyhow::Result<bool> {
        let inf = Tensor::zeros([], (Kind::Float, Device::Cpu));
        let grads = sgd.flat_grads().shallow_clone();
        crate::torch_ext::non_finite_check_and_unscale(
            &[&grads],
            &inf,
            &Tensor::from(grad_scale as f32),
        )?;
        sgd.step(&Tensor::from(lr as f32), &inf)?;
        Ok(inf.double_value(&[]) == 0.0)
    }

    #[test]
    fn no_weight_decay_on_bn_and_bias() -> anyhow::Result<()> {
        let vs = VarStore::new(Device::Cpu);
        let cfg = convnets_models::ModelConfig::default();
        convnets_models::registry::build("resnet18", &vs.root(), 10, &cfg)?;
        let sgd = Sgd::new(&vs, 0.875, 3.0517578125e-05, false)?;
        let (decay, no_decay) = sgd.groups();
        assert!(decay
            .iter()
            .all(|n| n.ends_with("weight") && !n.contains("bn") && !n.contains("downsample.1")));
        assert!(
            no_decay.contains(&"fc.bias")
                && no_decay.contains(&"bn1.weight")
                && no_decay.contains(&"layer1.0.bn2.bias")
        );
        assert!(decay.contains(&"fc.weight") && decay.contains(&"conv1.weight"));
        assert!(!decay.iter().any(|n| n.contains("running")));
        assert_eq!(decay.len() + no_decay.len(), vs.trainable_variables().len());
        assert_eq!(sgd.numel(), 11_181_642, "resnet18 with 10 classes");
        assert!(
            sgd.aligned(),
            "every parameter at a 64-byte boundary despite the 10-element fc.bias"
        );
        Ok(())
    }

    #[test]
    fn matches_hand_computed_momentum_steps() -> anyhow::Result<()> {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[2, 2], nn::Init::Const(1.0));
        let b = vs.root().var("b", &[2], nn::Init::Const(1.0));
        let mut sgd = Sgd::new(&vs, 0.5, 0.1, false)?;
        for _ in 0..3 {
            sgd.zero_grad();
            (w.sum(Kind::Float) + b.sum(Kind::Float)).backward();
            take_step(&mut sgd, 0.1, 1.0)?;
        }
        // w: g = 1 + 0.1 w; buf = 0.5 buf + g; w -= 0.1 buf.
        let (mut wv, mut wb, mut bv, mut bb) = (1.0f64, 0.0f64, 1.0f64, 0.0f64);
        for _ in 0..3 {
            wb = 0.5 * wb + 1.0 + 0.1 * wv;
            wv -= 0.1 * wb;
            bb = 0.5 * bb + 1.0; // no decay on the 1-D parameter
            bv -= 0.1 * bb;
        }
        assert!(
            (w.double_value(&[0, 0]) - wv).abs() < 1e-6,
            "{} vs {wv}",
            w.double_value(&[0, 0])
        );
        assert!((b.double_value(&[0]) - bv).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn backbone_lr_is_scaled_and_the_classifier_keeps_the_full_lr() -> anyhow::Result<()> {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let names = ["conv.weight", "bn.bias", "fc.weight", "fc.bias"];
        let vars: Vec<Tensor> = names
            .iter()
            .map(|n| {
                let (path, leaf) = n.split_once('.').unwrap();
                let shape: &[i64] = if leaf == "weight" { &[2, 2] } else { &[2] };
                root.sub(path).var(leaf, shape, nn::Init::Const(1.0))
            })
            .collect();
        let mut sgd = Sgd::new(&vs, 0.5, 0.1, false)?;
        sgd.backbone_lr_scale = 0.25;
        let (decay, no_decay) = sgd.groups();
        assert_eq!(
            (decay, no_decay),
            (vec!["conv.weight", "fc.weight"], vec!["fc.bias", "bn.bias"])
        );
        for _ in 0..2 {
            sgd.zero_grad();
            vars.iter()
                .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |acc, v| {
                    acc + v.sum(Kind::Float)
                })
                .backward();
            take_step(&mut sgd, 0.1, 1.0)?;
        }
        // Hand-computed: g = 1 (+ 0.1 w when decayed); buf = 0.5 buf + g; w -= lr * buf.
        let expect = |decayed: bool, lr: f64| {
            let (mut w, mut buf) = (1.0f64, 0.0f64);
            for _ in 0..2 {
                buf = 0.5 * buf + 1.0 + if decayed { 0.1 * w } else { 0.0 };
                w -= lr * buf;
            }
            w
        };
        let got: Vec<f64> = vars
            .iter()
            .map(|v| v.flatten(0, -1).double_value(&[0]))
            .collect();
        let want = [
            expect(true, 0.025),
            expect(false, 0.025),
            expect(true, 0.1),
            expect(false, 0.1),
        ];
        for ((name, g), w) in names.iter().zip(&got).zip(want) {
            assert!((g - w).abs() < 1e-6, "{name}: {g} vs {w}");
        }
        Ok(())
    }

    #[test]
    fn flat_update_equals_a_per_parameter_update_on_a_real_model() -> anyhow::Result<()> {
        // Reference: the same model and data updated tensor by tensor.
        let rng = crate::train::INIT_RNG
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(1);
        let (vs_a, vs_b) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let cfg = convnets_models::ModelConfig::default();
        let a = convnets_models::registry::build("resnet18", &vs_a.root(), 4, &cfg)?;
        let b = convnets_models::registry::build("resnet18", &vs_b.root(), 4, &cfg)?;
        let mut vs_b = vs_b;
        vs_b.copy(&vs_a)?;
        let mut sgd = Sgd::new(&vs_a, 0.875, 0.01, true)?;
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        drop(rng);
        let y = Tensor::from_slice(&[1i64, 3]);
        let mut bufs: HashMap<String, Tensor> = HashMap::new();
        for _ in 0..2 {
            sgd.zero_grad();
            a.forward_t(&x, true)
                .cross_entropy_for_logits(&y)
                .backward();
            assert!(take_step(&mut sgd, 0.05, 0.5)?);

            for mut t in vs_b.trainable_variables() {
                t.zero_grad();
            }
            b.forward_t(&x, true)
                .cross_entropy_for_logits(&y)
                .backward();
            let _g = tch::no_grad_guard();
            for (name, mut p) in vs_b
                .variables()
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
            {
                let mut d = p.grad() * 0.5;
                if p.dim() > 1 {
                    d += &p * 0.01;
                }
                let buf = bufs.entry(name).or_insert_with(|| d.zeros_like());
                *buf *= 0.875;
                *buf += &d;
                let upd = d + &*buf * 0.875;
                p -= upd * 0.05;
            }
        }
        let (va, vb) = (vs_a.variables(), vs_b.variables());
        for (name, t) in &va {
            let diff = (t - &vb[name]).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name} differs by {diff}");
        }
        // Momentum survives a save/load round trip.
        let state: HashMap<String, Tensor> = sgd.momentum_views().into_iter().collect();
        let mut other = Sgd::new(&vs_a, 0.875, 0.01, true)?;
        other.load_state(&state)?;
        let back: HashMap<String, Tensor> = other.momentum_views().into_iter().collect();
        assert!(state.iter().all(|(k, v)| v.equal(&back[k])));
        Ok(())
    }
}
