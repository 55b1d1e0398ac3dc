//! `--device`: where a command's model runs, shared by `train`, `eval`, `predict` and
//! `bench`.

use anyhow::bail;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum DeviceArg {
    /// The first GPU when there is one, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The device a `--device` flag names, refusing `cuda` when libtorch sees no GPU.
pub fn device_of(arg: DeviceArg) -> anyhow::Result<Device> {
    Ok(match arg {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Auto => Device::cuda_if_available(),
        DeviceArg::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        DeviceArg::Cuda => bail!(
            "--device cuda: libtorch sees no GPU{}",
            if cfg!(feature = "cuda") {
                ""
            } else {
                " (built without CUDA)"
            }
        ),
    })
}
