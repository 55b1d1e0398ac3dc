//! Sizes typed on the command line against the memory that has to hold them. A batch whose
//! images alone cannot fit on their device is refused before anything is allocated or
//! written, with the bytes it would need; an allocation that fails later (activations,
//! gradients) becomes an error naming the batch size and the device: never a panic, an
//! abort or a C++ backtrace.

use anyhow::bail;
use convnets_pipeline::loader::{Backend, LoaderConfig};
use tch::Device;

use crate::units::format_bytes;

/// Bytes of memory `device` has in all: the machine's (`MemTotal`) for the CPU, the GPU's
/// for CUDA. `None` when unknown; then nothing is refused up front.
pub fn total_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => host_total_bytes(),
        Device::Cuda(index) => gpu_total_bytes(index),
        _ => None,
    }
}

fn host_total_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(feature = "cuda")]
fn gpu_total_bytes(index: usize) -> Option<u64> {
    use cudarc::driver::result;
    // libtorch sees this GPU, so the driver is loaded; cuDeviceTotalMem needs no context.
    if !tch::Cuda::is_available() {
        return None;
    }
    result::init().ok()?;
    let dev = result::device::get(i32::try_from(index).ok()?).ok()?;
    // SAFETY: `dev` was just returned by cuDeviceGet.
    let bytes = unsafe { result::device::total_mem(dev) }.ok()?;
    Some(bytes as u64)
}

#[cfg(not(feature = "cuda"))]
fn gpu_total_bytes(_index: usize) -> Option<u64> {
    None
}

/// `batches` batches of `batch` images of `size` x `size` x 3 values of `value_bytes` each.
#[derive(Debug, Clone, Copy)]
pub struct ImageBatches {
    pub batch: usize,
    pub size: u32,
    pub value_bytes: usize,
    pub batches: usize,
}

impl ImageBatches {
    pub fn bytes(&self) -> u128 {
        let side = u128::from(self.size);
        [
            self.batch as u128,
            3,
            side,
            side,
            self.value_bytes as u128,
            self.batches as u128,
        ]
        .into_iter()
        .fold(1u128, u128::saturating_mul)
    }

    /// Refuses, before anything is allocated, images that cannot fit on `device`
    /// (`holder` says what would keep them there, e.g. "the CPU loader").
    pub fn check(&self, device: Device, holder: &str) -> anyhow::Result<()> {
        let Some(total) = total_bytes(device) else {
            return Ok(());
        };
        let bytes = self.bytes();
        if bytes <= u128::from(total) {
            return Ok(());
        }
        let copies = if self.batches > 1 {
            format!(", {} batches at a time", self.batches)
        } else {
            String::new()
        };
        bail!(
            "--batch-size {} at --image-size {} needs {} for {holder} ({} x 3 x {} x {} x {} bytes{copies}), \
             more than the {} of memory on {}: choose a smaller --batch-size or --image-size",
            self.batch,
            self.size,
            format_bytes(u64::try_from(bytes).unwrap_or(u64::MAX)),
            self.batch,
            self.size,
            self.size,
            self.value_bytes,
            format_bytes(total),
            device_name(device),
        )
    }
}

/// Refuses a loader whose batches cannot fit: the CPU loader keeps `prefetch + 2` batches
/// in host memory (its slots), the GPU loader at least one on `device`.
pub fn check_loader(cfg: &LoaderConfig, device: Device) -> anyhow::Result<()> {
    let (where_, batches, holder) = match cfg.backend {
        Backend::Cpu => (
            Device::Cpu,
            cfg.prefetch.max(1) + 2,
            "the CPU loader's batches",
        ),
        Backend::Gpu(_) => (device, 1, "the GPU loader's batches"),
    };
    ImageBatches {
        batch: cfg.sampler.batch_size,
        size: cfg.output.width.max(cfg.output.height),
        value_bytes: cfg.output.dtype.size(),
        batches,
    }
    .check(where_, holder)
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "this machine (--device cpu)".into(),
        Device::Cuda(i) => format!("GPU {i}"),
        other => format!("{other:?}"),
    }
}

/// Whether `e` (or a cause of it) is an allocation that failed: libtorch's CPU or CUDA
/// allocator, or a host buffer of ours.
pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let text = cause.to_string();
        [
            "can't allocate memory",
            "out of memory",
            "Cannot allocate memory",
        ]
        .iter()
        .any(|needle| text.contains(needle))
    })
}

/// An allocation failure as the user can act on it: what ran out, with which batch size,
/// on which device. Other errors pass through unchanged.
pub fn name_allocation_failure(
    e: anyhow::Error,
    batch: usize,
    image_size: u32,
    device: Device,
) -> anyhow::Error {
    if !is_out_of_memory(&e) {
        return e;
    }
    let cause = crate::error_text(&e);
    anyhow::anyhow!(
        "out of memory on {} with --batch-size {batch} at --image-size {image_size}: {cause}; \
         a smaller --batch-size or --image-size may fit",
        device_name(device)
    )
}

/// Drops the C++ stack trace libtorch appends to its messages (`Exception raised from ...`,
/// `frame #N: ...`): it says nothing a user can act on and buries the message.
pub fn without_backtrace(text: &str) -> String {
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !(l.starts_with("frame #") || l.starts_with("Exception raised from"))
        })
        .collect();
    kept.join("\n").trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_larger_than_the_machine_is_refused_with_its_bytes() {
        let huge = ImageBatches {
            batch: 100_000_000,
            size: 224,
            value_bytes: 4,
            batches: 1,
        };
        assert_eq!(huge.bytes(), 60_211_200_000_000);
        let e = huge.check(Device::Cpu, "one batch of images").unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("--batch-size 100000000") && text.contains("TiB"),
            "{text}"
        );
        let small = ImageBatches {
            batch: 2,
            size: 32,
            value_bytes: 4,
            batches: 5,
        };
        small
            .check(Device::Cpu, "the CPU loader's batches")
            .unwrap();
        // No overflow at the largest sizes a flag can hold.
        let max = ImageBatches {
            batch: usize::MAX,
            size: u32::MAX,
            value_bytes: 4,
            batches: 5,
        };
        assert!(max.check(Device::Cpu, "x").is_err());
    }

    #[test]
    fn a_failed_libtorch_allocation_names_the_batch_and_device_without_a_backtrace() {
        let err = tch::Tensor::f_empty([1 << 40, 1 << 20], (tch::Kind::Float, Device::Cpu))
            .map(|_| ())
            .map_err(anyhow::Error::from)
            .unwrap_err();
        assert!(is_out_of_memory(&err), "{err:#}");
        let named = name_allocation_failure(err, 4096, 224, Device::Cpu);
        let text = crate::error_text(&named);
        assert!(
            text.contains("--batch-size 4096") && text.contains("--device cpu"),
            "{text}"
        );
        assert!(!text.contains("frame #"), "{text}");
        let other = name_allocation_failure(anyhow::anyhow!("no such file"), 1, 1, Device::Cpu);
        assert_eq!(other.to_string(), "no such file");
    }
}
