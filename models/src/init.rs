//! Initialisation, as the seed (NVIDIA DeepLearningExamples RN50 v1.5), torchvision and timm do it.
//!
//! - convolutions: He / Kaiming normal, `mode='fan_out'`, `nonlinearity='relu'`
//!   (std = sqrt(2 / (out_channels * kh * kw)));
//! - batch norm: gamma 1, beta 0, running mean 0, running var 1; the last BN of each residual
//!   branch optionally gets gamma 0 (Goyal et al. 2017, "zero_init_last" in timm), so every
//!   block starts as the identity;
//! - linear layer and conv biases (the SE module's): PyTorch's default `reset_parameters`,
//!   i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both weight and bias (torchvision and timm
//!   leave these alone).

use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::nn::Init;

/// Kaiming normal, fan_out, ReLU gain: every conv weight.
pub const CONV_WEIGHT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

/// BN gamma, except the zero-initialised last BN of a residual branch.
pub const BN_WEIGHT: Init = Init::Const(1.0);

/// BN gamma of the last BN of a residual branch when `zero_init_last_bn` is on.
pub const BN_WEIGHT_ZERO: Init = Init::Const(0.0);

/// BN beta.
pub const BN_BIAS: Init = Init::Const(0.0);

/// PyTorch's default for `nn.Linear` / `nn.Conv2d` weights and biases, whose bound works out
/// to 1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5) for the weight).
pub fn default_uniform(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}
