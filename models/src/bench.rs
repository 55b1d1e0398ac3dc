//! Training-step throughput (images/s) on synthetic data: the model's share of a training run.
//!
//! One step is forward (under fp16 autocast when `amp`), cross-entropy, backward, and tch's
//! SGD with momentum 0.9 and weight decay 1e-4 (libtorch's per-parameter loop; the training
//! engine's flattened update will be faster). No loss scaling: it costs one fused kernel per
//! step and does not change the model's share. Inputs are 224x224, 1000 classes, made once.

use std::fmt;
use std::time::Instant;

use tch::nn::{OptimizerConfig, Sgd};
use tch::{Cuda, Device, Kind, Reduction, Tensor};

use crate::error::{Error, Result};
use crate::layout::{to_channels_last, MemoryFormat};
use crate::registry::Arch;
use crate::resnet::ModelConfig;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchConfig {
    /// Architecture.
    pub arch: Arch,
    /// Images per step.
    pub batch: i64,
    /// fp16 autocast for forward and loss (CUDA only; tch's autocast is a no-op elsewhere).
    pub amp: bool,
    /// NHWC weights and activations.
    pub channels_last: bool,
    /// Where to run.
    pub device: Device,
    /// Untimed steps first (cuDNN autotuning, allocator warm-up).
    pub warmup_steps: usize,
    /// Timed steps.
    pub steps: usize,
    /// Input height and width.
    pub image_size: i64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            arch: Arch::ResNet50,
            batch: 256,
            amp: true,
            channels_last: true,
            device: Device::Cuda(0),
            warmup_steps: 10,
            steps: 30,
            image_size: 224,
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Throughput {
    /// What was measured.
    pub config: BenchConfig,
    /// Wall time of the timed steps, seconds (device synchronised at both ends).
    pub seconds: f64,
    /// `batch * steps / seconds`.
    pub images_per_sec: f64,
    /// Loss of the last step (a sanity check: finite, near ln(1000) = 6.9 at first).
    pub last_loss: f64,
}

impl fmt::Display for Throughput {
    /// One line of JSON.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        write!(
            f,
            "{{\"arch\":\"{}\",\"batch\":{},\"amp\":{},\"channels_last\":{},\"device\":\"{:?}\",\
             \"image_size\":{},\"steps\":{},\"seconds\":{:.4},\"images_per_sec\":{:.1},\"last_loss\":{:.4}}}",
            c.arch, c.batch, c.amp, c.channels_last, c.device, c.image_size, c.steps, self.seconds,
            self.images_per_sec, self.last_loss
        )
    }
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        Cuda::synchronize(index as i64);
    }
}

/// Measures training steps per second for `arch` with the defaults of [`BenchConfig`].
pub fn train_step_throughput(
    arch: Arch,
    batch: i64,
    amp: bool,
    channels_last: bool,
    device: Device,
) -> Result<Throughput> {
    let config = BenchConfig {
        arch,
        batch,
        amp,
        channels_last,
        device,
        ..BenchConfig::default()
    };
    measure(&config)
}

/// Measures training steps per second as `config` says.
pub fn measure(config: &BenchConfig) -> Result<Throughput> {
    let device = config.device;
    if let Device::Cuda(index) = device {
        if !Cuda::is_available() || index as i64 >= Cuda::device_count() {
            return Err(Error::DeviceUnavailable(device));
        }
        Cuda::cudnn_set_benchmark(true);
    }
    let memory_format = if config.channels_last {
        MemoryFormat::ChannelsLast
    } else {
        MemoryFormat::Contiguous
    };
    let vs = tch::nn::VarStore::new(device);
    let model = config.arch.build(
        &vs.root(),
        1000,
        &ModelConfig {
            memory_format,
            ..ModelConfig::default()
        },
    )?;
    let mut opt = Sgd {
        momentum: 0.9,
        dampening: 0.0,
        wd: 1e-4,
        nesterov: false,
    }
    .build(&vs, 0.1)?;

    let size = config.image_size;
    let mut images = Tensor::f_randn([config.batch, 3, size, size], (Kind::Float, device))?;
    if config.channels_last {
        images = to_channels_last(&images)?;
    }
    let labels = Tensor::f_randint(1000, [config.batch], (Kind::Int64, device))?;

    let mut step = || -> Result<Tensor> {
        opt.zero_grad();
        let loss = tch::autocast(config.amp, || -> Result<Tensor> {
            let logits = model.f_forward_t(&images, true)?;
            Ok(logits.f_cross_entropy_loss(&labels, None::<Tensor>, Reduction::Mean, -100, 0.0)?)
        })?;
        loss.f_backward()?;
        opt.step();
        Ok(loss)
    };
    for _ in 0..config.warmup_steps {
        let _ = step()?;
    }
    synchronize(device);
    let started = Instant::now();
    let mut loss = None;
    for _ in 0..config.steps {
        loss = Some(step()?);
    }
    synchronize(device);
    let seconds = started.elapsed().as_secs_f64();
    let last_loss = match loss {
        Some(loss) => loss.f_double_value(&[])?,
        None => f64::NAN,
    };
    Ok(Throughput {
        config: *config,
        seconds,
        images_per_sec: (config.batch as f64) * (config.steps as f64) / seconds,
        last_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_the_cpu_and_prints_json() -> Result<()> {
        let config = BenchConfig {
            arch: Arch::ResNet18,
            batch: 2,
            amp: false,
            channels_last: true,
            device: Device::Cpu,
            warmup_steps: 1,
            steps: 1,
            image_size: 64,
        };
        let result = measure(&config)?;
        assert!(result.images_per_sec > 0.0 && result.last_loss.is_finite());
        let json = result.to_string();
        assert!(
            json.starts_with("{\"arch\":\"resnet18\",\"batch\":2,"),
            "{json}"
        );
        Ok(())
    }

    #[test]
    fn missing_gpu_is_an_error() {
        if Cuda::is_available() {
            return;
        }
        let result = train_step_throughput(Arch::ResNet18, 2, true, true, Device::Cuda(0));
        assert!(matches!(
            result,
            Err(Error::DeviceUnavailable(Device::Cuda(0)))
        ));
    }
}
