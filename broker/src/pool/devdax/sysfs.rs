//! The kernel's device-dax sysfs interface (see shared facts: device-dax.md).
//!
//! Every write here is a sysfs attribute write whose errno is the kernel's answer, so errors
//! carry the path, the value and the errno.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::DaxError;

const DEVICES: &str = "/sys/bus/dax/devices";
const DRIVER: &str = "/sys/bus/dax/drivers/device_dax";

fn read(path: &Path) -> Result<String, DaxError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| DaxError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn read_u64(path: &Path) -> Result<u64, DaxError> {
    let text = read(path)?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| DaxError::Parse {
        path: path.to_path_buf(),
        text,
    })
}

fn write(path: &Path, value: &str) -> Result<(), DaxError> {
    std::fs::write(path, value).map_err(|source| DaxError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// One device-dax region, found through its devices in /sys/bus/dax/devices.
#[derive(Debug, Clone)]
pub struct Region {
    pub id: u32,
    /// `…/dax_region` of the region's parent device (e.g. /sys/devices/platform/hmem.0).
    pub dir: PathBuf,
    /// Physical start (dynamic regions: from /proc/iomem).
    pub base: u64,
    pub size: u64,
    pub align: u64,
    /// Has `create`/`delete`: sub-devices can be made (dax_hmem); else static (pmem namespace).
    pub dynamic: bool,
    /// The NUMA node of the region's memory (its devices' `target_node`; none when -1).
    pub node: Option<u32>,
}

/// A device of the region as sysfs shows it.
#[derive(Debug, Clone)]
pub struct DeviceState {
    pub name: String,
    pub size: u64,
    pub driver: Option<String>,
}

fn device_dir(name: &str) -> PathBuf {
    Path::new(DEVICES).join(name)
}

/// Device names `dax{id}.N` of region `id`, in numeric order.
pub fn region_devices(id: u32) -> Result<Vec<String>, DaxError> {
    let prefix = format!("dax{id}.");
    let entries = std::fs::read_dir(DEVICES).map_err(|source| DaxError::Read {
        path: DEVICES.into(),
        source,
    })?;
    let mut names: Vec<(u32, String)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| {
            let n = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((n, name))
        })
        .collect();
    names.sort();
    Ok(names.into_iter().map(|(_, name)| name).collect())
}

/// Size and driver of a device.
pub fn device_state(name: &str) -> Result<DeviceState, DaxError> {
    let dir = device_dir(name);
    let size = read_u64(&dir.join("size"))?;
    let driver = std::fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    Ok(DeviceState {
        name: name.to_string(),
        size,
        driver,
    })
}

impl Region {
    /// Finds region `id`.
    pub fn find(id: u32) -> Result<Region, DaxError> {
        let devices = region_devices(id)?;
        let Some(first) = devices.first() else {
            return Err(DaxError::NoRegion(id));
        };
        let device = std::fs::canonicalize(device_dir(first)).map_err(|source| DaxError::Read {
            path: device_dir(first),
            source,
        })?;
        let parent = device.parent().ok_or(DaxError::NoRegion(id))?.to_path_buf();
        let dir = parent.join("dax_region");
        let dynamic = dir.join("create").exists();
        // Every device of a region has the region's target_node.
        let node = read(&device_dir(first).join("target_node"))
            .ok()
            .and_then(|n| n.parse::<i64>().ok())
            .and_then(|n| u32::try_from(n).ok());
        let size = read_u64(&dir.join("size"))?;
        let align = read_u64(&dir.join("align"))?;
        let base = if dynamic {
            let owner = parent
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            iomem_start(&owner)?
        } else {
            0
        };
        Ok(Region {
            id,
            dir,
            base,
            size,
            align,
            dynamic,
            node,
        })
    }

    /// Creates an empty device and returns its name.
    pub fn create_device(&self) -> Result<String, DaxError> {
        write(&self.dir.join("create"), "1")?;
        read(&self.dir.join("create"))
    }

    /// Deletes an unbound, size-0 device.
    pub fn delete_device(&self, name: &str) -> Result<(), DaxError> {
        write(&self.dir.join("delete"), name)
    }
}

/// The physical start of `owner`'s top-level range in /proc/iomem (root sees real addresses).
fn iomem_start(owner: &str) -> Result<u64, DaxError> {
    let path = Path::new("/proc/iomem");
    let iomem = read(path)?;
    for line in iomem.lines() {
        let Some((range, name)) = line.trim().split_once(" : ") else {
            continue;
        };
        if name != owner {
            continue;
        }
        let start = range.split('-').next().unwrap_or_default();
        let start = u64::from_str_radix(start, 16).map_err(|_| DaxError::Parse {
            path: path.into(),
            text: line.into(),
        })?;
        if start == 0 {
            return Err(DaxError::NotRoot);
        }
        return Ok(start);
    }
    Err(DaxError::Parse {
        path: path.into(),
        text: format!("no range named {owner}"),
    })
}

/// Sets a device's mapping alignment (only while unbound).
pub fn set_align(name: &str, align: u64) -> Result<(), DaxError> {
    write(&device_dir(name).join("align"), &align.to_string())
}

/// Adds the physical range `[start, start + len)` to an unbound device. Never call this on a
/// bound device: the kernel accepts it and then oopses on the first fault in the new range.
pub fn add_mapping(name: &str, start: u64, len: u64) -> Result<(), DaxError> {
    let end = start + len - 1;
    write(
        &device_dir(name).join("mapping"),
        &format!("{start:#x}-{end:#x}"),
    )
}

/// Shrinks an unbound device to nothing (returns its ranges to the region).
pub fn set_size_zero(name: &str) -> Result<(), DaxError> {
    write(&device_dir(name).join("size"), "0")
}

/// A device's mapping alignment in bytes.
pub fn align(name: &str) -> Result<u64, DaxError> {
    read_u64(&device_dir(name).join("align"))
}

pub fn size(name: &str) -> Result<u64, DaxError> {
    read_u64(&device_dir(name).join("size"))
}

pub fn bind(name: &str) -> Result<(), DaxError> {
    write(&Path::new(DRIVER).join("bind"), name)
}

/// Unbinds a device from device_dax; an unbound device is left alone.
pub fn unbind(name: &str) -> Result<(), DaxError> {
    if device_state(name)?.driver.is_none() {
        return Ok(());
    }
    write(&Path::new(DRIVER).join("unbind"), name)
}

/// Waits (up to 2 s) for devtmpfs to show /dev/NAME.
pub fn wait_for_node(name: &str) -> Result<PathBuf, DaxError> {
    let node = Path::new("/dev").join(name);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !node.exists() {
        if Instant::now() > deadline {
            return Err(DaxError::NoNode(node));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(node)
}

/// The device's ranges in file-offset order (`mappingN/{start,end}`).
pub fn mappings(name: &str) -> Result<Vec<(u64, u64)>, DaxError> {
    let dir = device_dir(name);
    let mut out = Vec::new();
    for i in 0.. {
        let m = dir.join(format!("mapping{i}"));
        if !m.exists() {
            break;
        }
        let start = read_u64(&m.join("start"))?;
        let end = read_u64(&m.join("end"))?;
        out.push((start, end + 1 - start));
    }
    Ok(out)
}

/// Whether a device exists.
pub fn exists(name: &str) -> bool {
    device_dir(name).exists()
}

/// Re-creates the device of a static region (a pmem namespace in devdax mode): its parent, the
/// namespace's dax device on the nd bus, is unbound from its driver (dax_pmem) and bound again.
/// The kernel tears the old device down — its mappings are gone and its fds refuse every mmap
/// and fault for good, since a torn-down device is never brought back — and makes a new one
/// of the same name on the same memory. Returns the new device's node.
pub fn recreate_static(name: &str) -> Result<PathBuf, DaxError> {
    let problem = |problem: &str| DaxError::Recreate {
        device: name.to_string(),
        problem: problem.to_string(),
    };
    let device = std::fs::canonicalize(device_dir(name)).map_err(|source| DaxError::Read {
        path: device_dir(name),
        source,
    })?;
    let parent = device
        .parent()
        .ok_or_else(|| problem("it has no parent device"))?;
    let parent_name = parent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| problem("it has no parent device"))?;
    let driver = std::fs::canonicalize(parent.join("driver"))
        .map_err(|_| problem("its parent device has no driver"))?;
    write(&driver.join("unbind"), &parent_name)?;
    write(&driver.join("bind"), &parent_name)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while device_state(name)
        .map(|d| d.driver.is_none())
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            return Err(problem("the new device did not appear bound to device_dax"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_for_node(name)
}
