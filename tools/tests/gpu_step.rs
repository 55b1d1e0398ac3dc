//! The training step on the GPU (run on the GPU machine: `scripts/gpu-build`, then
//! `dist/gpu/gpu-run`): steps replayed from a CUDA graph give the losses of the same steps
//! taken eagerly, and an injected inf skips exactly that step and halves the loss scale.
#![cfg(feature = "cuda")]

use convnets_models::resnet::ResNet;
use convnets_models::{registry, MemoryFormat, ModelConfig};
use convnets_tools::train::scaler::LossScaler;
use convnets_tools::train::sgd::Sgd;
use convnets_tools::train::step::{StepInput, StepOptions, TrainStep};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const STEPS: usize = 50;
/// Distinct batches, cycled through the steps: few enough to be memorised (so the loss
/// falls), more than one so that each replay copies new data into the captured inputs.
const BATCHES: usize = 4;

fn trainee(cuda_graphs: bool) -> anyhow::Result<(VarStore, ResNet, TrainStep)> {
    let device = Device::Cuda(0);
    let vs = VarStore::new(Device::Cpu);
    tch::manual_seed(7);
    let cfg = ModelConfig {
        memory_format: MemoryFormat::ChannelsLast,
        ..ModelConfig::default()
    };
    let model = registry::build("resnet18", &vs.root(), 10, &cfg)?;
    let mut vs = vs;
    vs.set_device(device);
    tch::Cuda::cudnn_set_benchmark(true);
    let sgd = Sgd::new(&vs, 0.875, 3.0517578125e-05, false)?;
    let opts = StepOptions {
        amp: true,
        label_smoothing: 0.1,
        train_bn: true,
        cuda_graphs,
        allreduce_kind: Kind::Float,
    };
    let step = TrainStep::new(sgd, &LossScaler::new(true), opts, device)?;
    Ok((vs, model, step))
}

/// The same batches for every run: made on the CPU from a fixed seed, then moved.
fn batches() -> Vec<(Tensor, Tensor)> {
    tch::manual_seed(11);
    (0..BATCHES)
        .map(|_| {
            let x = Tensor::randn([32, 3, 64, 64], (Kind::Float, Device::Cpu))
                .to_kind(Kind::Half)
                .to_device(Device::Cuda(0));
            let x = convnets_models::layout::to_channels_last(&x).expect("channels_last");
            let y =
                Tensor::randint(10, [32], (Kind::Int64, Device::Cpu)).to_device(Device::Cuda(0));
            (x, y)
        })
        .collect()
}

/// Per-step losses (read back after every step, for the comparison).
fn losses(cuda_graphs: bool, data: &[(Tensor, Tensor)]) -> anyhow::Result<(Vec<f64>, bool)> {
    let (_vs, model, mut step) = trainee(cuda_graphs)?;
    let mut out = Vec::new();
    for (x, y) in data.iter().cycle().take(STEPS) {
        step.run(&model, StepInput::new(x, y), 0.02, None)?;
        out.push(step.readout()?.loss);
    }
    Ok((out, step.graphed()))
}

#[test]
fn graph_replayed_steps_give_the_losses_of_eager_steps() -> anyhow::Result<()> {
    let data = batches();
    let (eager, eager_graphed) = losses(false, &data)?;
    let (replayed, graphed) = losses(true, &data)?;
    assert!(
        !eager_graphed && graphed,
        "the second run replays a captured graph"
    );
    let worst = eager
        .iter()
        .zip(&replayed)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "eager {:.4}..{:.4}, graph {:.4}..{:.4}, largest step difference {worst:.2e}",
        eager[0],
        eager[STEPS - 1],
        replayed[0],
        replayed[STEPS - 1]
    );
    assert!(eager.iter().chain(&replayed).all(|l| l.is_finite()));
    // fp16 autocast: cuDNN may pick other algorithms per run, so not bit-equal.
    assert!(
        worst < 0.05,
        "losses differ by {worst}: {eager:?} vs {replayed:?}"
    );
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    assert!(
        mean(&replayed[STEPS - BATCHES..]) < mean(&replayed[..BATCHES]) - 0.1,
        "it learns: {replayed:?}"
    );
    Ok(())
}

#[test]
fn an_injected_inf_skips_that_step_and_halves_the_scale_in_a_graph() -> anyhow::Result<()> {
    let data = batches();
    let (vs, model, mut step) = trainee(true)?;
    for (x, y) in data.iter().cycle().take(5) {
        step.run(&model, StepInput::new(x, y), 0.02, None)?;
    }
    let before = step.readout()?;
    assert!(step.graphed());
    let weights: Vec<(String, Tensor)> = vs
        .trainable_variables()
        .iter()
        .enumerate()
        .map(|(i, t)| (i.to_string(), t.copy()))
        .collect();
    let bad = data[1].0.copy();
    let _ = bad.narrow(0, 0, 1).fill_(f64::INFINITY);
    step.run(&model, StepInput::new(&bad, &data[1].1), 0.02, None)?;
    let after = step.readout()?;
    assert_eq!(after.skipped_steps, before.skipped_steps + 1);
    assert_eq!(after.loss_scale, before.loss_scale / 2.0);
    for ((_, w), now) in weights.iter().zip(vs.trainable_variables()) {
        assert!(w.equal(&now), "a skipped step changed a weight");
    }
    step.run(&model, StepInput::new(&data[2].0, &data[2].1), 0.02, None)?;
    let next = step.readout()?;
    assert_eq!(
        next.skipped_steps, after.skipped_steps,
        "the next finite step is taken"
    );
    assert!(next.loss.is_finite());
    Ok(())
}
