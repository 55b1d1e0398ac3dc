//! The training step: the one place a batch becomes an update, used by `train`,
//! `bench train` and `bench e2e`.
//!
//! forward (fp16 autocast with `amp`) -> label-smoothed cross-entropy -> backward of the
//! scaled loss -> mean of the gradients over the ranks -> unscale + inf/NaN check -> fused
//! SGD (skipped on the device when a gradient is not finite) -> loss-scale update -> EMA.
//!
//! Nothing in a step waits for the GPU: the LR, loss scale, found-inf flag, the summed loss
//! and the count of non-finite losses in a row are device tensors, read back only by
//! [`TrainStep::readout`] (at logging intervals). On CUDA with fixed shapes the whole step
//! is captured once as a CUDA graph and replayed: the batch is copied into static input
//! buffers first. Anything else (CPU, mixup, a batch of another shape) runs eagerly through
//! the same code.

use anyhow::Context;
use tch::{Device, Kind, Reduction, Tensor};

use super::distributed::Distributed;
use super::scaler::{DeviceScaler, LossScaler};
use super::sgd::Sgd;
use convnets_models::resnet::ResNet;

#[cfg(feature = "cuda")]
/// Eager steps on libtorch's default stream before the capture (cuDNN's autotuning and
/// the gradient buffers' first use happen there), besides one more on a side stream.
const EAGER_STEPS_BEFORE_CAPTURE: u64 = 2;

/// What a step does besides the update itself.
#[derive(Debug, Clone)]
pub struct StepOptions {
    /// fp16 autocast for the forward pass and dynamic loss scaling.
    pub amp: bool,
    pub label_smoothing: f64,
    /// BN layers in training mode (false for a frozen backbone: running statistics stay).
    pub train_bn: bool,
    /// Capture the step as a CUDA graph where it can be.
    pub cuda_graphs: bool,
    /// The dtype gradients travel in between ranks.
    pub allreduce_kind: Kind,
}

/// A batch to train on: images and labels on the step's device, and optionally the mixup
/// partner labels with their weight (eager only: the weight is a host number).
pub struct StepInput<'a> {
    pub images: &'a Tensor,
    pub labels: &'a Tensor,
    pub mixed_with: Option<(f64, &'a Tensor)>,
}

impl<'a> StepInput<'a> {
    /// A plain batch (no mixup).
    pub fn new(images: &'a Tensor, labels: &'a Tensor) -> Self {
        Self {
            images,
            labels,
            mixed_with: None,
        }
    }
}

/// What the steps since the last readout did (one host synchronisation).
#[derive(Debug, Clone, PartialEq)]
pub struct Readout {
    /// Steps since the last readout.
    pub steps: u64,
    /// Their mean loss (NaN/inf when any was).
    pub loss: f64,
    /// The longest run of non-finite losses in a row so far.
    pub nonfinite_streak: u64,
    pub skipped_steps: u64,
    pub loss_scale: f64,
}

enum Graph {
    /// Eager steps only.
    Off,
    /// Eager until the capture.
    Warming,
    #[cfg(feature = "cuda")]
    Ready(Captured),
}

#[cfg(feature = "cuda")]
struct Captured {
    graph: crate::torch_ext::cuda::CudaGraph,
    images: Tensor,
    labels: Tensor,
}

pub struct TrainStep {
    opts: StepOptions,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Device,
    pub sgd: Sgd,
    scaler: DeviceScaler,
    /// f32, one element: this step's learning rate.
    lr: Tensor,
    /// f32, one element each: losses summed since the last readout; non-finite losses in a
    /// row; the longest such run.
    loss_sum: Tensor,
    streak: Tensor,
    max_streak: Tensor,
    pending: u64,
    eager_steps: u64,
    graph: Graph,
    /// Why the step runs eagerly although graphs were asked for (said once).
    graph_note: Option<String>,
}

impl TrainStep {
    pub fn new(
        sgd: Sgd,
        scaler: &LossScaler,
        opts: StepOptions,
        device: Device,
    ) -> anyhow::Result<Self> {
        let zero = || Tensor::f_zeros([], (Kind::Float, device));
        let graph = if opts.cuda_graphs && device.is_cuda() && cfg!(feature = "cuda") {
            Graph::Warming
        } else {
            Graph::Off
        };
        Ok(Self {
            scaler: DeviceScaler::new(scaler, device)?,
            lr: zero()?,
            loss_sum: zero()?,
            streak: zero()?,
            max_streak: zero()?,
            pending: 0,
            eager_steps: 0,
            graph,
            graph_note: None,
            opts,
            device,
            sgd,
        })
    }

    /// Whether steps are replayed from a captured CUDA graph.
    pub fn graphed(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Graph::Ready(_) = self.graph {
            return true;
        }
        false
    }

    /// Why the step runs eagerly although CUDA graphs were asked for, if it does.
    pub fn graph_note(&self) -> Option<&str> {
        self.graph_note.as_deref()
    }

    /// Takes one step at learning rate `lr`; returns without waiting for the GPU.
    pub fn run(
        &mut self,
        model: &ResNet,
        input: StepInput,
        lr: f64,
        dist: Option<&Distributed>,
    ) -> anyhow::Result<()> {
        let _ = self.lr.f_fill_(lr)?;
        #[cfg(feature = "cuda")]
        if let Graph::Ready(c) = &mut self.graph {
            if input.mixed_with.is_none()
                && same_layout(&c.images, input.images)
                && same_layout(&c.labels, input.labels)
            {
                c.images.f_copy_(input.images)?;
                c.labels.f_copy_(input.labels)?;
                c.graph.replay()?;
                self.pending += 1;
                return Ok(());
            }
        }
        if input.mixed_with.is_some() && matches!(self.graph, Graph::Warming) {
            self.graph = Graph::Off;
            self.graph_note = Some("mixup draws its weights on the host each step".into());
        }
        #[cfg(feature = "cuda")]
        if matches!(self.graph, Graph::Warming) && self.eager_steps >= EAGER_STEPS_BEFORE_CAPTURE {
            self.warm_up_and_capture(model, &input, dist)?;
            self.pending += 1;
            return Ok(());
        }
        self.body(model, &input, dist)?;
        self.eager_steps += 1;
        self.pending += 1;
        Ok(())
    }

    /// This call's step eagerly on a side stream (what PyTorch recommends before a
    /// capture), then the capture of the step on static copies of this batch's buffers;
    /// later calls replay it. A capture that fails leaves the step eager, with the reason.
    #[cfg(feature = "cuda")]
    fn warm_up_and_capture(
        &mut self,
        model: &ResNet,
        input: &StepInput,
        dist: Option<&Distributed>,
    ) -> anyhow::Result<()> {
        use crate::torch_ext::cuda::{CudaGraph, SideStream};
        let Device::Cuda(index) = self.device else {
            return self.body(model, input, dist);
        };
        let side = SideStream::enter(index)?;
        self.body(model, input, dist)?;
        side.exit()?;
        self.eager_steps += 1;
        let images = input.images.f_empty_like()?;
        let labels = input.labels.f_empty_like()?;
        let static_input = StepInput::new(&images, &labels);
        match CudaGraph::capture(index, || self.body(model, &static_input, dist)) {
            Ok((graph, ())) => {
                self.graph = Graph::Ready(Captured {
                    graph,
                    images,
                    labels,
                })
            }
            Err(e) => {
                self.graph = Graph::Off;
                self.graph_note = Some(format!("{e:#}"));
            }
        }
        Ok(())
    }

    /// The step itself: only device work, no host reads (it is what a graph captures).
    fn body(
        &mut self,
        model: &ResNet,
        input: &StepInput,
        dist: Option<&Distributed>,
    ) -> anyhow::Result<()> {
        self.sgd.zero_grad();
        let smoothing = self.opts.label_smoothing;
        let loss = tch::autocast(self.opts.amp, || -> anyhow::Result<Tensor> {
            let logits = model
                .f_forward_t(input.images, self.opts.train_bn)?
                .f_to_kind(Kind::Float)?;
            let ce = |y: &Tensor| {
                logits.f_cross_entropy_loss(y, None::<Tensor>, Reduction::Mean, -100, smoothing)
            };
            Ok(match input.mixed_with {
                Some((lambda, other)) => ce(input.labels)?
                    .f_mul_scalar(lambda)?
                    .f_add(&ce(other)?.f_mul_scalar(1.0 - lambda)?)?,
                None => ce(input.labels)?,
            })
        })?;
        loss.f_mul(self.scaler.scale())?
            .f_backward()
            .context("backward pass")?;
        let grads = self.sgd.flat_grads().shallow_clone();
        if let Some(d) = dist {
            // The mean gradient over the ranks; every rank then takes the same step (and
            // the same skip decision on inf/NaN).
            d.all_reduce_mean_in(&grads, self.opts.allreduce_kind)?;
        }
        self.scaler.unscale(&grads)?;
        self.sgd.step(&self.lr, self.scaler.found_inf())?;
        self.scaler.update()?;
        let _guard = tch::no_grad_guard();
        let loss = loss.f_detach()?;
        let _ = self.loss_sum.f_add_(&loss)?;
        let nonfinite = loss.f_isfinite()?.f_logical_not()?;
        let _ = self.streak.f_add_scalar_(1.0)?.f_mul_(&nonfinite)?;
        let _ = self
            .max_streak
            .f_maximum_out(&self.max_streak, &self.streak)?;
        Ok(())
    }

    /// What the steps since the last call did; waits for the device (once).
    pub fn readout(&mut self) -> anyhow::Result<Readout> {
        let host = self.scaler.to_host()?;
        let loss_sum = self.loss_sum.f_double_value(&[])?;
        let streak = self.max_streak.f_double_value(&[])? as u64;
        let _ = self.loss_sum.f_zero_()?;
        let steps = std::mem::take(&mut self.pending);
        Ok(Readout {
            steps,
            loss: if steps > 0 {
                loss_sum / steps as f64
            } else {
                f64::NAN
            },
            nonfinite_streak: streak,
            skipped_steps: host.skipped_steps,
            loss_scale: host.scale,
        })
    }

    /// The loss scaler's state, for a checkpoint (waits for the device).
    pub fn scaler_state(&self) -> anyhow::Result<LossScaler> {
        self.scaler.to_host()
    }
}

/// Same shape, strides and dtype: the batch can be copied into the captured buffer.
#[cfg(feature = "cuda")]
fn same_layout(captured: &Tensor, t: &Tensor) -> bool {
    captured.size() == t.size()
        && captured.stride() == t.stride()
        && captured.kind() == t.kind()
        && captured.device() == t.device()
}

/// Keeps a host batch alive until the GPU has copied it: the copy is asynchronous (from
/// pinned memory), so its slot may go back to the loader only once a fence after it has
/// passed. Waiting on the previous batch's fence, not this one's, leaves the GPU a step of
/// queued work.
pub struct HostBatchRelease<T> {
    #[cfg(feature = "cuda")]
    held: Option<(T, crate::torch_ext::cuda::Fence)>,
    #[cfg(not(feature = "cuda"))]
    held: std::marker::PhantomData<T>,
}

impl<T> Default for HostBatchRelease<T> {
    fn default() -> Self {
        Self {
            held: Default::default(),
        }
    }
}

impl<T> HostBatchRelease<T> {
    /// Hands over `batch` after its copy to `device` was queued.
    pub fn hold(&mut self, batch: T, device: Device) -> anyhow::Result<()> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(index) = device {
            let fence = crate::torch_ext::cuda::Fence::record(index)?;
            if let Some((previous, fence)) = self.held.replace((batch, fence)) {
                fence.wait()?;
                drop(previous);
            }
            return Ok(());
        }
        // On the CPU the copy is done when it returns.
        let _ = device;
        drop(batch);
        Ok(())
    }
}

/// Random images (normal, NCHW or channels_last on CUDA) and labels on `device`: the
/// input of compute-only runs.
pub fn synthetic_batch(
    batch: i64,
    size: i64,
    classes: i64,
    device: Device,
    amp: bool,
) -> anyhow::Result<(Tensor, Tensor)> {
    let kind = if amp { Kind::Half } else { Kind::Float };
    let images = Tensor::f_randn([batch, 3, size, size], (kind, device))?;
    let images = if device.is_cuda() {
        convnets_models::layout::to_channels_last(&images)?
    } else {
        images
    };
    Ok((
        images,
        Tensor::f_randint(classes, [batch], (Kind::Int64, device))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    fn setup(lr_scale_steps: bool) -> anyhow::Result<(VarStore, ResNet, TrainStep)> {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let model = convnets_models::registry::build(
            "resnet18",
            &vs.root(),
            4,
            &convnets_models::ModelConfig::default(),
        )?;
        let sgd = Sgd::new(&vs, 0.875, 3.0517578125e-05, lr_scale_steps)?;
        let opts = StepOptions {
            amp: false,
            label_smoothing: 0.1,
            train_bn: true,
            cuda_graphs: true,
            allreduce_kind: Kind::Float,
        };
        let step = TrainStep::new(sgd, &LossScaler::new(false), opts, Device::Cpu)?;
        Ok((vs, model, step))
    }

    #[test]
    fn a_step_learns_and_the_readout_averages_the_losses() -> anyhow::Result<()> {
        let (_vs, model, mut step) = setup(false)?;
        let images = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 1, 2, 3]);
        let input = || StepInput::new(&images, &labels);
        step.run(&model, input(), 0.05, None)?;
        let first = step.readout()?;
        assert_eq!(
            (first.steps, first.skipped_steps, first.nonfinite_streak),
            (1, 0, 0)
        );
        for _ in 0..8 {
            step.run(&model, input(), 0.05, None)?;
        }
        let later = step.readout()?;
        assert_eq!(later.steps, 8);
        assert!(later.loss < first.loss, "{later:?} after {first:?}");
        assert!(!step.graphed(), "no graphs on the CPU");
        Ok(())
    }

    #[test]
    fn a_non_finite_loss_skips_the_step_and_is_counted() -> anyhow::Result<()> {
        let (vs, model, mut step) = setup(true)?;
        let labels = Tensor::from_slice(&[0i64, 1]);
        let good = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        step.run(&model, StepInput::new(&good, &labels), 0.05, None)?;
        let before: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.copy()))
            .collect();
        let bad = good.full_like(f64::NAN);
        for _ in 0..3 {
            step.run(&model, StepInput::new(&bad, &labels), 0.05, None)?;
        }
        let r = step.readout()?;
        assert_eq!((r.skipped_steps, r.nonfinite_streak), (3, 3));
        assert!(r.loss.is_nan());
        for (name, v) in before {
            if name.contains("running") || name.contains("num_batches") {
                continue; // BN statistics see the batch in the forward pass
            }
            assert!(
                vs.variables()[&name].equal(&v),
                "{name} changed on a skipped step"
            );
        }
        Ok(())
    }
}
