//! GPU memory, read through NVML (`libnvidia-ml.so.1`, which the NVIDIA driver installs; loaded at
//! run time, so the binary runs on hosts without it).
//!
//! Per device: memory used and total, and what this process holds on it (from NVML's list of
//! compute processes; absent where the driver cannot see this process's pid, e.g. in some
//! containers). NVML is opened once; on a host without the driver every read answers `None` and
//! the reason is logged once. Reads are cheap (a few driver calls) and done at scrape time.

use std::sync::OnceLock;

use nvml_wrapper::{enums::device::UsedGpuMemory, Nvml};

/// Memory of one GPU.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GpuMemory {
    pub index: u32,
    pub name: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
    /// Held by this process, when the driver reports it.
    pub process_bytes: Option<u64>,
}

static NVML: OnceLock<Option<Nvml>> = OnceLock::new();

fn nvml() -> Option<&'static Nvml> {
    NVML.get_or_init(|| match Nvml::init() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::debug!(error = %e, "NVML not available: GPU memory is not measured");
            None
        }
    })
    .as_ref()
}

/// Memory of every GPU NVML sees; `None` when NVML cannot be opened (no NVIDIA driver).
pub fn gpu_memory() -> Option<Vec<GpuMemory>> {
    let nvml = nvml()?;
    let me = std::process::id();
    let count = nvml.device_count().ok()?;
    let mut out = Vec::new();
    for i in 0..count {
        let Ok(d) = nvml.device_by_index(i) else { continue };
        let Ok(m) = d.memory_info() else { continue };
        let process_bytes = d.running_compute_processes().ok().and_then(|ps| {
            ps.into_iter().find(|p| p.pid == me).map(|p| match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => b,
                UsedGpuMemory::Unavailable => 0,
            })
        });
        out.push(GpuMemory { index: i, name: d.name().unwrap_or_default(), used_bytes: m.used, total_bytes: m.total, process_bytes });
    }
    Some(out)
}

/// This process's GPU memory over all devices, bytes; `None` without NVML or when the driver does
/// not list this process.
pub fn process_gpu_bytes() -> Option<u64> {
    let devs = gpu_memory()?;
    let held: Vec<u64> = devs.iter().filter_map(|d| d.process_bytes).collect();
    (!held.is_empty()).then(|| held.iter().sum())
}
