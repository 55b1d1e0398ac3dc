//! ResNet v1.5 (He et al. 2016, arXiv:1512.03385; v1.5: stride 2 on the 3x3 conv of the bottleneck, as torchvision), ResNeXt (Xie et al. 2017, arXiv:1611.05431) and SE-ResNeXt (Hu et al. 2018, arXiv:1709.01507; SE after the last BN of each block, as timm and NVIDIA DeepLearningExamples).
//!
//! Parameter and buffer names are torchvision's for the ResNets and timm's for (SE-)ResNeXt
//! (`conv1`, `bn1`, `layer{1..4}.{i}.{conv,bn}{1,2,3}`, `layer{1..4}.0.downsample.{0,1}`,
//! `layer{1..4}.{i}.se.fc{1,2}`, `fc`), BN buffers included (`running_mean`, `running_var`,
//! `num_batches_tracked`), so their `state_dict`s load as they are.
//!
//! Every layer is built with `f_` (fallible) tch calls: a bad input gives an [`Error`] from
//! [`ResNet::f_forward_t`]; the [`ModuleT`] impl panics with that error's message, as tch's
//! own layers do.

use tch::nn::{ModuleT, Path};
use tch::{no_grad, Kind, Tensor};

use crate::error::{Error, Result};
use crate::init;
use crate::layout::{to_channels_last, MemoryFormat};

/// BatchNorm2d defaults in PyTorch (and in the seed).
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

/// Options that do not change the parameter set, only its initial values and layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    /// Initialise gamma of the last BN of each residual branch to 0, so every block starts as
    /// the identity (Goyal et al. 2017; the seed's recipe, timm's default). Default: true.
    pub zero_init_last_bn: bool,
    /// Layout of the conv weights and of the activations. With `ChannelsLast` the weights are
    /// stored NHWC and the model converts its input batch on entry (no copy when it already is
    /// NHWC); cuDNN then keeps every activation NHWC. Default: `Contiguous`.
    pub memory_format: MemoryFormat,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            zero_init_last_bn: true,
            memory_format: MemoryFormat::Contiguous,
        }
    }
}

/// The residual block a network is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convs (ResNet-18/34).
    Basic,
    /// 1x1 -> 3x3 (strided, grouped for ResNeXt) -> 1x1 with 4x expansion (ResNet-50 and up).
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block divided by its `planes`.
    pub fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The shape of a ResNet-family network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetSpec {
    /// Residual block type.
    pub block: BlockKind,
    /// Number of blocks in `layer1` .. `layer4`.
    pub layers: [usize; 4],
    /// Groups of the bottleneck's 3x3 conv (ResNeXt cardinality; 1 for ResNet).
    pub groups: i64,
    /// Channels per group in `layer1`'s 3x3 conv (64 for ResNet, 4 for ResNeXt 32x4d).
    pub width_per_group: i64,
    /// Squeeze-excitation reduction ratio (16 for SE-ResNeXt), or `None` for no SE module.
    pub se_reduction: Option<i64>,
}

impl ResNetSpec {
    /// Features entering the classifier (512 for Basic, 2048 for Bottleneck).
    pub fn num_features(&self) -> i64 {
        512 * self.block.expansion()
    }

    /// Rejects shapes that would divide by zero or build empty layers.
    pub fn validate(&self) -> Result<()> {
        let problem = if self.groups < 1 {
            "groups must be at least 1"
        } else if self.width_per_group < 1 {
            "width_per_group must be at least 1"
        } else if self.block == BlockKind::Basic && (self.groups, self.width_per_group) != (1, 64) {
            "basic blocks support only groups = 1 and width_per_group = 64 (as torchvision)"
        } else if self.se_reduction.is_some_and(|r| r < 1) {
            "se_reduction must be at least 1"
        } else {
            return Ok(());
        };
        Err(Error::InvalidSpec {
            spec: *self,
            problem,
        })
    }
}

/// A conv layer without the tch `Conv2D` defaults (kaiming-uniform weights, bias on).
#[derive(Debug)]
struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    groups: i64,
}

/// Geometry of one conv layer.
#[derive(Debug, Clone, Copy)]
struct ConvShape {
    c_in: i64,
    c_out: i64,
    kernel: i64,
    stride: i64,
    groups: i64,
    bias: bool,
}

impl ConvShape {
    fn new(c_in: i64, c_out: i64, kernel: i64, stride: i64) -> Self {
        Self {
            c_in,
            c_out,
            kernel,
            stride,
            groups: 1,
            bias: false,
        }
    }
}

impl Conv2d {
    fn new(p: &Path, s: ConvShape, format: MemoryFormat) -> Result<Self> {
        let weight = p.f_var(
            "weight",
            &[s.c_out, s.c_in / s.groups, s.kernel, s.kernel],
            init::CONV_WEIGHT,
        )?;
        if format == MemoryFormat::ChannelsLast {
            let nhwc = no_grad(|| to_channels_last(&weight))?;
            weight.shallow_clone().f_set_data(&nhwc)?;
        }
        let bias = if s.bias {
            let fan_in = s.c_in / s.groups * s.kernel * s.kernel;
            Some(p.f_var("bias", &[s.c_out], init::default_uniform(fan_in))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride: s.stride,
            padding: s.kernel / 2,
            groups: s.groups,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(xs.f_conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            self.groups,
        )?)
    }
}

/// `nn.BatchNorm2d` with all of its state, `num_batches_tracked` included (tch's lacks it).
#[derive(Debug)]
struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

impl BatchNorm2d {
    fn new(p: &Path, channels: i64, zero_gamma: bool) -> Result<Self> {
        let gamma = if zero_gamma {
            init::BN_WEIGHT_ZERO
        } else {
            init::BN_WEIGHT
        };
        let num_batches_tracked = Tensor::f_zeros([], (Kind::Int64, p.device()))?;
        Ok(Self {
            weight: p.f_var("weight", &[channels], gamma)?,
            bias: p.f_var("bias", &[channels], init::BN_BIAS)?,
            running_mean: p.f_zeros_no_train("running_mean", &[channels])?,
            running_var: p.f_ones_no_train("running_var", &[channels])?,
            num_batches_tracked: p.add("num_batches_tracked", num_batches_tracked, false),
        })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            // As PyTorch does; with a fixed momentum the count is informational only.
            let _ = no_grad(|| self.num_batches_tracked.shallow_clone().f_add_scalar_(1))?;
        }
        Ok(xs.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )?)
    }
}

/// timm's `make_divisible(v, divisor, round_limit=0.)`: nearest multiple, at least `divisor`.
fn make_divisible(v: f64, divisor: i64) -> i64 {
    let rounded = (v + divisor as f64 / 2.0) as i64 / divisor * divisor;
    rounded.max(divisor)
}

/// timm's `SEModule`: global average pool -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> sigmoid gate.
#[derive(Debug)]
struct SqueezeExcite {
    fc1: Conv2d,
    fc2: Conv2d,
}

impl SqueezeExcite {
    fn new(p: &Path, channels: i64, reduction: i64, format: MemoryFormat) -> Result<Self> {
        let reduced = make_divisible(channels as f64 / reduction as f64, 8);
        let shape = |c_in, c_out| ConvShape {
            bias: true,
            ..ConvShape::new(c_in, c_out, 1, 1)
        };
        Ok(Self {
            fc1: Conv2d::new(&p.sub("fc1"), shape(channels, reduced), format)?,
            fc2: Conv2d::new(&p.sub("fc2"), shape(reduced, channels), format)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let squeezed = xs.f_mean_dim([2i64, 3].as_slice(), true, None::<Kind>)?;
        let excited = self.fc2.forward(&self.fc1.forward(&squeezed)?.f_relu()?)?;
        Ok(xs.f_mul(&excited.f_sigmoid()?)?)
    }
}

/// One residual block: a branch of (conv, BN) pairs with ReLUs between them, an optional SE
/// module after the last BN, a shortcut (projected when the shape changes), a final ReLU.
#[derive(Debug)]
struct ResidualBlock {
    branch: Vec<(Conv2d, BatchNorm2d)>,
    se: Option<SqueezeExcite>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

/// What one block is asked to do.
#[derive(Debug, Clone, Copy)]
struct BlockShape {
    c_in: i64,
    planes: i64,
    stride: i64,
}

impl ResidualBlock {
    fn new(p: &Path, spec: &ResNetSpec, b: BlockShape, cfg: &ModelConfig) -> Result<Self> {
        let format = cfg.memory_format;
        let c_out = b.planes * spec.block.expansion();
        // (c_in, c_out, kernel, stride, groups) of each conv in the branch; v1.5 strides the 3x3.
        let convs = match spec.block {
            BlockKind::Basic => vec![
                ConvShape::new(b.c_in, b.planes, 3, b.stride),
                ConvShape::new(b.planes, b.planes, 3, 1),
            ],
            BlockKind::Bottleneck => {
                let width = b.planes * spec.width_per_group / 64 * spec.groups;
                vec![
                    ConvShape::new(b.c_in, width, 1, 1),
                    ConvShape {
                        groups: spec.groups,
                        ..ConvShape::new(width, width, 3, b.stride)
                    },
                    ConvShape::new(width, c_out, 1, 1),
                ]
            }
        };
        let last = convs.len() - 1;
        let mut branch = Vec::with_capacity(convs.len());
        for (i, shape) in convs.into_iter().enumerate() {
            let n = i + 1;
            let conv = Conv2d::new(&p.sub(format!("conv{n}")), shape, format)?;
            let zero_gamma = cfg.zero_init_last_bn && i == last;
            let bn = BatchNorm2d::new(&p.sub(format!("bn{n}")), shape.c_out, zero_gamma)?;
            branch.push((conv, bn));
        }
        let se = match spec.se_reduction {
            Some(r) => Some(SqueezeExcite::new(&p.sub("se"), c_out, r, format)?),
            None => None,
        };
        let downsample = if b.stride != 1 || b.c_in != c_out {
            let d = p.sub("downsample");
            let conv = Conv2d::new(
                &d.sub(0),
                ConvShape::new(b.c_in, c_out, 1, b.stride),
                format,
            )?;
            Some((conv, BatchNorm2d::new(&d.sub(1), c_out, false)?))
        } else {
            None
        };
        Ok(Self {
            branch,
            se,
            downsample,
        })
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.branch.len() - 1;
        let mut ys = xs.shallow_clone();
        for (i, (conv, bn)) in self.branch.iter().enumerate() {
            ys = bn.forward_t(&conv.forward(&ys)?, train)?;
            if i != last {
                let _ = ys.f_relu_()?;
            }
        }
        if let Some(se) = &self.se {
            ys = se.forward(&ys)?;
        }
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(xs)?, train)?,
            None => xs.shallow_clone(),
        };
        let _ = ys.f_add_(&shortcut)?;
        let _ = ys.f_relu_()?;
        Ok(ys)
    }
}

/// The classifier, initialised as `nn.Linear` is.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(p: &Path, c_in: i64, c_out: i64) -> Result<Self> {
        Ok(Self {
            weight: p.f_var("weight", &[c_out, c_in], init::default_uniform(c_in))?,
            bias: p.f_var("bias", &[c_out], init::default_uniform(c_in))?,
        })
    }
}

/// A ResNet-family classifier: stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), four stages of
/// residual blocks, global average pool, linear layer. Input `[N, 3, H, W]`, output logits
/// `[N, num_classes]`.
#[derive(Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    stages: Vec<Vec<ResidualBlock>>,
    fc: Linear,
    spec: ResNetSpec,
    num_classes: i64,
    memory_format: MemoryFormat,
}

impl ResNet {
    /// The network's shape.
    pub fn spec(&self) -> &ResNetSpec {
        &self.spec
    }

    /// Number of output logits.
    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    /// Layout the model was built for (weights, and inputs on entry).
    pub fn memory_format(&self) -> MemoryFormat {
        self.memory_format
    }

    /// Pooled features `[N, num_features]` (everything but the classifier).
    pub fn f_forward_features(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let size = xs.size();
        if size.len() != 4 || size[1] != 3 {
            return Err(Error::InputShape { shape: size });
        }
        let xs = match self.memory_format {
            MemoryFormat::ChannelsLast => to_channels_last(xs)?,
            MemoryFormat::Contiguous => xs.shallow_clone(),
        };
        let mut ys = self.bn1.forward_t(&self.conv1.forward(&xs)?, train)?;
        let _ = ys.f_relu_()?;
        let mut ys = ys.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        for stage in &self.stages {
            for block in stage {
                ys = block.forward_t(&ys, train)?;
            }
        }
        Ok(ys.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?)
    }

    /// Logits `[N, num_classes]`; `train` selects batch statistics (and updates the running
    /// ones) in every BN, as `model.train()` does in PyTorch.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let features = self.f_forward_features(xs, train)?;
        Ok(features.f_linear(&self.fc.weight, Some(&self.fc.bias))?)
    }
}

impl ModuleT for ResNet {
    /// Panics on a bad input, as tch's layers do; use [`ResNet::f_forward_t`] for a `Result`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(xs, train) {
            Ok(logits) => logits,
            Err(err) => panic!("ResNet forward: {err}"),
        }
    }
}

/// Builds any ResNet-family network under `p` (use `vs.root()` for torchvision/timm names).
pub fn resnet(p: &Path, spec: &ResNetSpec, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
    if num_classes <= 0 {
        return Err(Error::InvalidNumClasses(num_classes));
    }
    spec.validate()?;
    let format = cfg.memory_format;
    let conv1 = Conv2d::new(&p.sub("conv1"), ConvShape::new(3, 64, 7, 2), format)?;
    let bn1 = BatchNorm2d::new(&p.sub("bn1"), 64, false)?;
    let mut c_in = 64;
    let mut stages = Vec::with_capacity(4);
    for (s, &depth) in spec.layers.iter().enumerate() {
        let planes = 64 << s;
        let stage_path = p.sub(format!("layer{}", s + 1));
        let mut blocks = Vec::with_capacity(depth);
        for i in 0..depth {
            let stride = if s > 0 && i == 0 { 2 } else { 1 };
            let shape = BlockShape {
                c_in,
                planes,
                stride,
            };
            blocks.push(ResidualBlock::new(&stage_path.sub(i), spec, shape, cfg)?);
            c_in = planes * spec.block.expansion();
        }
        stages.push(blocks);
    }
    let fc = Linear::new(&p.sub("fc"), c_in, num_classes)?;
    Ok(ResNet {
        conv1,
        bn1,
        stages,
        fc,
        spec: *spec,
        num_classes,
        memory_format: format,
    })
}

/// ResNet-18 (torchvision `resnet18`).
pub const RESNET18: ResNetSpec = ResNetSpec {
    block: BlockKind::Basic,
    layers: [2, 2, 2, 2],
    groups: 1,
    width_per_group: 64,
    se_reduction: None,
};

/// ResNet-34 (torchvision `resnet34`).
pub const RESNET34: ResNetSpec = ResNetSpec {
    layers: [3, 4, 6, 3],
    ..RESNET18
};

/// ResNet-50 v1.5 (torchvision `resnet50`).
pub const RESNET50: ResNetSpec = ResNetSpec {
    block: BlockKind::Bottleneck,
    layers: [3, 4, 6, 3],
    ..RESNET18
};

/// ResNet-101 v1.5 (torchvision `resnet101`).
pub const RESNET101: ResNetSpec = ResNetSpec {
    layers: [3, 4, 23, 3],
    ..RESNET50
};

/// ResNet-152 v1.5 (torchvision `resnet152`).
pub const RESNET152: ResNetSpec = ResNetSpec {
    layers: [3, 8, 36, 3],
    ..RESNET50
};

/// ResNeXt-101 32x4d (timm `resnext101_32x4d`).
pub const RESNEXT101_32X4D: ResNetSpec = ResNetSpec {
    groups: 32,
    width_per_group: 4,
    ..RESNET101
};

/// SE-ResNeXt-101 32x4d (timm `seresnext101_32x4d`).
pub const SERESNEXT101_32X4D: ResNetSpec = ResNetSpec {
    se_reduction: Some(16),
    ..RESNEXT101_32X4D
};

/// ResNet-18 under `p`.
pub fn resnet18(p: &Path, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
    resnet(p, &RESNET18, num_classes, cfg)
}

/// ResNet-34 under `p`.
pub fn resnet34(p: &Path, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
    resnet(p, &RESNET34, num_classes, cfg)
}

/// ResNet-50 v1.5 under `p`.
pub fn resnet50(p: &Path, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
    resnet(p, &RESNET50, num_classes, cfg)
}

/// ResNet-101 v1.5 under `p`.
pub fn resnet101(p: &Path, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
    resnet(p, &RESNET101, num_classes, cfg)
}

/// ResNet-152 v1.5 under `p`.
pub fn resnet152(p: &Path, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
    resnet(p, &RESNET152, num_classes, cfg)
}

/// ResNeXt-101 32x4d under `p`.
pub fn resnext101_32x4d(p: &Path, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
    resnet(p, &RESNEXT101_32X4D, num_classes, cfg)
}

/// SE-ResNeXt-101 32x4d under `p`.
pub fn seresnext101_32x4d(p: &Path, num_classes: i64, cfg: &ModelConfig) -> Result<ResNet> {
    resnet(p, &SERESNEXT101_32X4D, num_classes, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::Device;

    #[test]
    fn se_widths_match_timm() {
        // timm: make_divisible(channels / 16, 8, round_limit=0.)
        assert_eq!(make_divisible(256.0 / 16.0, 8), 16);
        assert_eq!(make_divisible(2048.0 / 16.0, 8), 128);
        assert_eq!(make_divisible(40.0 / 16.0, 8), 8);
        assert_eq!(make_divisible(100.0 / 16.0, 8), 8);
        assert_eq!(make_divisible(200.0 / 16.0, 8), 16);
    }

    #[test]
    fn rejects_bad_num_classes_specs_and_inputs() -> Result<()> {
        let vs = VarStore::new(Device::Cpu);
        let cfg = ModelConfig::default();
        for spec in [
            ResNetSpec {
                groups: 0,
                ..RESNEXT101_32X4D
            },
            ResNetSpec {
                width_per_group: 0,
                ..RESNET50
            },
            ResNetSpec {
                se_reduction: Some(0),
                ..RESNET50
            },
            ResNetSpec {
                groups: 32,
                ..RESNET18
            },
        ] {
            let result = resnet(&vs.root(), &spec, 10, &cfg);
            assert!(
                matches!(result, Err(Error::InvalidSpec { .. })),
                "{spec:?} accepted"
            );
        }
        assert!(matches!(
            resnet18(&vs.root(), 0, &cfg),
            Err(Error::InvalidNumClasses(0))
        ));
        let model = resnet18(&vs.root(), 10, &cfg)?;
        let gray = Tensor::f_zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu))?;
        assert!(matches!(
            model.f_forward_t(&gray, false),
            Err(Error::InputShape { .. })
        ));
        let flat = Tensor::f_zeros([3, 32], (Kind::Float, Device::Cpu))?;
        assert!(matches!(
            model.f_forward_t(&flat, false),
            Err(Error::InputShape { .. })
        ));
        Ok(())
    }

    fn abs_sum(vs: &VarStore, name: &str) -> Result<f64> {
        let vars = vs.variables();
        let t = vars
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        Ok(t.f_abs()?.f_sum(Kind::Double)?.f_double_value(&[])?)
    }

    #[test]
    fn initialisation_follows_the_recipe() -> Result<()> {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let _model = resnet50(&vs.root(), 1000, &ModelConfig::default())?;
        let vars = vs.variables();
        // He normal, fan_out: std = sqrt(2 / (64 * 7 * 7)) for the stem conv.
        let std = vars["conv1.weight"].f_std(true)?.f_double_value(&[])?;
        let expected = (2.0f64 / (64.0 * 49.0)).sqrt();
        assert!(
            (std / expected - 1.0).abs() < 0.05,
            "conv1 std {std} vs {expected}"
        );
        assert_eq!(abs_sum(&vs, "layer1.0.bn3.weight")?, 0.0);
        assert_eq!(abs_sum(&vs, "layer4.2.bn3.weight")?, 0.0);
        assert_eq!(abs_sum(&vs, "layer1.0.bn2.weight")?, 64.0);
        assert_eq!(abs_sum(&vs, "layer1.0.downsample.1.weight")?, 256.0);
        assert_eq!(abs_sum(&vs, "layer1.0.bn3.bias")?, 0.0);
        assert_eq!(abs_sum(&vs, "layer1.0.bn3.running_var")?, 256.0);
        // nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / 2048f64.sqrt();
        let fc_max = vars["fc.weight"].f_abs()?.f_max()?.f_double_value(&[])?;
        assert!(
            fc_max <= bound && fc_max > 0.9 * bound,
            "fc max {fc_max} vs bound {bound}"
        );

        let vs = VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            zero_init_last_bn: false,
            ..ModelConfig::default()
        };
        let _model = resnet18(&vs.root(), 10, &cfg)?;
        assert_eq!(abs_sum(&vs, "layer1.0.bn2.weight")?, 64.0);
        Ok(())
    }

    #[test]
    fn channels_last_model_keeps_values() -> Result<()> {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            zero_init_last_bn: false,
            memory_format: MemoryFormat::Contiguous,
        };
        let model = seresnext_tiny(&vs, &cfg)?;
        let nhwc_vs = VarStore::new(Device::Cpu);
        let nhwc_cfg = ModelConfig {
            memory_format: MemoryFormat::ChannelsLast,
            ..cfg
        };
        let nhwc = seresnext_tiny(&nhwc_vs, &nhwc_cfg)?;
        let mut dst = nhwc_vs;
        dst.copy(&vs)?;
        for (name, var) in dst.variables() {
            if var.dim() == 4 {
                assert!(
                    crate::layout::is_channels_last(&var),
                    "{name} is not NHWC after copy"
                );
            }
        }
        let xs = Tensor::f_randn([2, 3, 32, 48], (Kind::Float, Device::Cpu))?;
        let a = model.f_forward_t(&xs, false)?;
        let b = nhwc.f_forward_t(&xs, false)?;
        let diff = (a - &b).f_abs()?.f_max()?.f_double_value(&[])?;
        let scale = b.f_abs()?.f_max()?.f_double_value(&[])?;
        assert!(diff <= 1e-4 * scale, "NHWC vs NCHW: {diff} (scale {scale})");
        Ok(())
    }

    /// A small SE-ResNeXt (every feature: groups, SE, downsample) for fast unit tests.
    fn seresnext_tiny(vs: &VarStore, cfg: &ModelConfig) -> Result<ResNet> {
        let spec = ResNetSpec {
            layers: [1, 1, 1, 1],
            ..SERESNEXT101_32X4D
        };
        resnet(&vs.root(), &spec, 7, cfg)
    }
}
