//! What a libvirt domain's XML says about its guest RAM, and the leases the shim inside its
//! QEMU will ask for: the plan the qemu hook carries out. Pure: no broker, no files.

use std::collections::BTreeMap;

use membroker_client::PageSize;
use membroker_client::size::{format_size, parse_size};

/// libvirt's namespace for `<qemu:commandline>`.
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// The shim's smallest redirected RAM block when `MEMBROKER_MIN_SIZE` is not set.
const SHIM_MIN_SIZE: u64 = 64 << 20;
/// libvirt aligns each guest RAM size for QEMU to 1 MiB before it builds the command line.
const LIBVIRT_RAM_ALIGN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the domain XML does not parse")]
    Xml(#[source] roxmltree::Error),
    #[error("the domain XML has no <{0}>")]
    Missing(&'static str),
    #[error("<{element}> {value:?}: {why}")]
    Bad {
        element: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "LD_PRELOAD loads the membroker shim but MEMBROKER_LEASE_PREFIX is not set: add \
         <qemu:env name='MEMBROKER_LEASE_PREFIX' value='libvirt/{domain}'/> so the hook can \
         make the leases the shim will use"
    )]
    NoPrefix { domain: String },
    #[error(
        "MEMBROKER_LEASE_PREFIX {prefix:?} must end in the domain's name {domain:?} or its \
         UUID, so that no two domains share leases"
    )]
    SharedPrefix { prefix: String, domain: String },
    #[error(
        "<memoryBacking> asks for {what}, which QEMU maps from a file the shim leaves alone: \
         remove it (for huge pages set MEMBROKER_PAGE_SIZE=2M or 1G with <qemu:env> instead)"
    )]
    FileBacked { what: &'static str },
    #[error(
        "<memory model='{0}'> devices are not supported by the membroker hook: their RAM would \
         need leases it does not plan"
    )]
    MemoryDevice(String),
}

pub type Result<T> = std::result::Result<T, PlanError>;

/// The parts of a domain's XML the hook reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uuid: Option<String>,
    /// `<qemu:commandline><qemu:env name value/>`: what QEMU, and so the shim, sees.
    pub env: BTreeMap<String, String>,
    /// `<memory>` in bytes.
    pub memory: u64,
    /// `<cpu><numa><cell memory>` in bytes, in cell order.
    pub cells: Vec<u64>,
    /// `<memoryBacking>`: what makes QEMU use a file-backed memory backend, if anything.
    pub file_backed: Option<&'static str>,
    /// `<devices><memory model>`.
    pub memory_devices: Vec<String>,
    /// `<seclabel model='dac'><label>`: the user QEMU runs as, when the domain says.
    pub dac_label: Option<String>,
    /// `<seclabel model='apparmor'>`: its `type` and its `<label>`, if the domain has one.
    pub apparmor: Option<(String, Option<String>)>,
}

/// One lease the shim will open as `PREFIX/ramN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedLease {
    pub name: String,
    pub size: u64,
}

/// The leases of a domain that runs on broker memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub prefix: String,
    /// `MEMBROKER_SOCKET` of the domain, if set.
    pub socket: Option<String>,
    pub pool: Option<String>,
    pub page_size: Option<PageSize>,
    pub leases: Vec<PlannedLease>,
}

impl Domain {
    pub fn parse(xml: &str) -> Result<Domain> {
        let doc = roxmltree::Document::parse(xml).map_err(PlanError::Xml)?;
        let root = doc.root_element();
        let name = child(root, "name")
            .and_then(|n| n.text())
            .ok_or(PlanError::Missing("name"))?
            .trim()
            .to_string();
        let uuid = child(root, "uuid")
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string());
        let memory = size_of(
            child(root, "memory").ok_or(PlanError::Missing("memory"))?,
            "memory",
        )?;
        let cells = match child(root, "cpu").and_then(|c| child(c, "numa")) {
            Some(numa) => numa
                .children()
                .filter(|c| c.has_tag_name("cell"))
                .map(|cell| {
                    let value = cell.attribute("memory").unwrap_or_default();
                    size_in(value, cell.attribute("unit"), "cell")
                })
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        let file_backed = child(root, "memoryBacking").and_then(|b| {
            let source = child(b, "source").and_then(|s| s.attribute("type"));
            if child(b, "hugepages").is_some() {
                Some("<hugepages>")
            } else if source == Some("file") {
                Some("<source type='file'>")
            } else if source != Some("memfd")
                && child(b, "access").and_then(|a| a.attribute("mode")) == Some("shared")
            {
                Some("<access mode='shared'> without <source type='memfd'/>")
            } else {
                None
            }
        });
        let memory_devices = child(root, "devices")
            .map(|d| {
                d.children()
                    .filter(|c| c.has_tag_name("memory"))
                    .map(|m| m.attribute("model").unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default();
        let seclabel = |model: &str| {
            root.children()
                .filter(|c| c.has_tag_name("seclabel"))
                .find(|c| c.attribute("model") == Some(model))
        };
        let label_of = |c: roxmltree::Node| {
            child(c, "label")
                .and_then(|l| l.text())
                .map(|t| t.trim().to_string())
        };
        let dac_label = seclabel("dac").and_then(label_of);
        let apparmor = seclabel("apparmor").map(|c| {
            let kind = c.attribute("type").unwrap_or("dynamic").to_string();
            (kind, label_of(c))
        });
        let env = root
            .descendants()
            .filter(|n| n.has_tag_name((QEMU_NS, "env")))
            .filter_map(|n| Some((n.attribute("name")?.into(), n.attribute("value")?.into())))
            .collect();
        Ok(Domain {
            name,
            uuid,
            env,
            memory,
            cells,
            file_backed,
            memory_devices,
            dac_label,
            apparmor,
        })
    }

    /// The leases the shim in this domain's QEMU will ask for, or None when the domain does
    /// not run on broker memory (no `MEMBROKER_LEASE_PREFIX` and no shim in `LD_PRELOAD`).
    pub fn plan(&self) -> Result<Option<Plan>> {
        let Some(prefix) = self.env.get("MEMBROKER_LEASE_PREFIX") else {
            let preload = self.env.get("LD_PRELOAD").map(String::as_str);
            if preload.is_some_and(|p| p.contains("libmembroker_preload")) {
                return Err(PlanError::NoPrefix {
                    domain: self.name.clone(),
                });
            }
            return Ok(None);
        };
        let prefix = prefix.trim_end_matches('/').to_string();
        let last = prefix.rsplit('/').next().unwrap_or_default();
        if last != self.name && Some(last) != self.uuid.as_deref() {
            return Err(PlanError::SharedPrefix {
                prefix,
                domain: self.name.clone(),
            });
        }
        if let Some(what) = self.file_backed {
            return Err(PlanError::FileBacked { what });
        }
        if let Some(model) = self.memory_devices.first() {
            return Err(PlanError::MemoryDevice(model.clone()));
        }
        let env_value = |key: &'static str| self.env.get(key).map(String::as_str);
        let min_size = match env_value("MEMBROKER_MIN_SIZE") {
            Some(v) => parse_size(v).map_err(|e| bad_env("MEMBROKER_MIN_SIZE", v, e))?,
            None => SHIM_MIN_SIZE,
        };
        let page_size = env_value("MEMBROKER_PAGE_SIZE")
            .map(|v| {
                v.parse::<PageSize>()
                    .map_err(|e| bad_env("MEMBROKER_PAGE_SIZE", v, e))
            })
            .transpose()?;
        // QEMU allocates one RAM block per NUMA cell, in cell order, or one for all of
        // <memory>; the shim names those it redirects ram0, ram1, … as they come.
        let blocks = if self.cells.is_empty() {
            vec![self.memory]
        } else {
            self.cells.clone()
        };
        let leases = blocks
            .into_iter()
            .map(|size| size.next_multiple_of(LIBVIRT_RAM_ALIGN))
            .filter(|size| *size >= min_size)
            .enumerate()
            .map(|(i, size)| PlannedLease {
                name: format!("{prefix}/ram{i}"),
                size,
            })
            .collect();
        Ok(Some(Plan {
            prefix,
            socket: self.env.get("MEMBROKER_SOCKET").cloned(),
            pool: self.env.get("MEMBROKER_POOL").cloned(),
            page_size,
            leases,
        }))
    }
}

fn bad_env(key: &str, value: &str, why: impl ToString) -> PlanError {
    PlanError::Bad {
        element: "qemu:env",
        value: format!("{key}={value}"),
        why: why.to_string(),
    }
}

/// The first child element of `node` named `name` (in any namespace).
fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// An element whose text is a size in its `unit` attribute (libvirt's default: KiB).
fn size_of(node: roxmltree::Node<'_, '_>, element: &'static str) -> Result<u64> {
    size_in(
        node.text().unwrap_or_default(),
        node.attribute("unit"),
        element,
    )
}

/// libvirt's scaled integers: `b`/`bytes`, `KB` (1000), `k`/`KiB` (1024), and so on up to
/// `T`; no unit means KiB.
fn size_in(value: &str, unit: Option<&str>, element: &'static str) -> Result<u64> {
    let bad = |why: &str| PlanError::Bad {
        element,
        value: format!("{value} {}", unit.unwrap_or("KiB")),
        why: why.to_string(),
    };
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| bad("not a whole number"))?;
    let unit = unit.unwrap_or("KiB");
    let (power, base) = match unit {
        "b" | "bytes" => (0, 1024u64),
        "KB" => (1, 1000),
        "k" | "K" | "KiB" => (1, 1024),
        "MB" => (2, 1000),
        "M" | "MiB" => (2, 1024),
        "GB" => (3, 1000),
        "G" | "GiB" => (3, 1024),
        "TB" => (4, 1000),
        "T" | "TiB" => (4, 1024),
        _ => return Err(bad("unknown unit")),
    };
    n.checked_mul(base.pow(power))
        .ok_or_else(|| bad("too large"))
}

impl Plan {
    /// Whether `name` is one of the leases the shim names under this plan's prefix
    /// (`PREFIX/ramN`), planned now or left by an earlier definition of the domain.
    pub fn is_ram_lease(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix("/ram"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// One line per lease, for messages: `libvirt/vm1/ram0 (256 MiB)`.
    pub fn describe(&self) -> String {
        let leases: Vec<String> = self
            .leases
            .iter()
            .map(|l| format!("{} ({})", l.name, format_size(l.size)))
            .collect();
        leases.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn domain(memory: &str, extra: &str, env: &[(&str, &str)]) -> String {
        let env: String = env
            .iter()
            .map(|(k, v)| format!("<qemu:env name='{k}' value='{v}'/>"))
            .collect();
        format!(
            "<domain type='qemu' xmlns:qemu='{QEMU_NS}'>\n\
               <name>vm1</name><uuid>5a1c1d9e-32ad-4a4b-9b2a-4b1f3a6c2d10</uuid>\n\
               {memory}\n{extra}\n\
               <qemu:commandline>{env}</qemu:commandline>\n\
             </domain>"
        )
    }

    fn plan(xml: &str) -> Result<Option<Plan>> {
        Domain::parse(xml)?.plan()
    }

    const SHIM: (&str, &str) = (
        "LD_PRELOAD",
        "/usr/lib/x86_64-linux-gnu/libmembroker_preload.so",
    );
    const PREFIX: (&str, &str) = ("MEMBROKER_LEASE_PREFIX", "libvirt/vm1");

    #[test]
    fn one_lease_of_the_domain_memory() {
        let xml = domain(
            "<memory unit='KiB'>262144</memory><currentMemory unit='KiB'>131072</currentMemory>",
            "",
            &[
                SHIM,
                PREFIX,
                ("MEMBROKER_SOCKET", "/run/membroker/broker.sock"),
                ("MEMBROKER_POOL", "vms"),
                ("MEMBROKER_PAGE_SIZE", "2M"),
            ],
        );
        let plan = plan(&xml).unwrap().unwrap();
        assert_eq!(
            plan,
            Plan {
                prefix: "libvirt/vm1".into(),
                socket: Some("/run/membroker/broker.sock".into()),
                pool: Some("vms".into()),
                page_size: Some(PageSize::Huge2M),
                leases: vec![PlannedLease {
                    name: "libvirt/vm1/ram0".into(),
                    size: 256 * MIB
                }],
            }
        );
        assert_eq!(plan.describe(), "libvirt/vm1/ram0 (256 MiB)");
    }

    #[test]
    fn units_and_libvirt_alignment() {
        for (memory, size) in [
            ("<memory>524288</memory>", 512 * MIB),
            ("<memory unit='G'>1</memory>", 1024 * MIB),
            ("<memory unit='MiB'>300</memory>", 300 * MIB),
            ("<memory unit='b'>104857600</memory>", 100 * MIB),
            // 100 MB is 95.37 MiB: libvirt gives QEMU 96 MiB.
            ("<memory unit='MB'>100</memory>", 96 * MIB),
        ] {
            let plan = plan(&domain(memory, "", &[PREFIX])).unwrap().unwrap();
            assert_eq!(plan.leases[0].size, size, "{memory}");
        }
        for bad in [
            "<memory unit='parsec'>1</memory>",
            "<memory>lots</memory>",
            "<memory unit='T'>99999999999</memory>",
        ] {
            let err = plan(&domain(bad, "", &[PREFIX])).unwrap_err();
            assert!(matches!(err, PlanError::Bad { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn one_lease_per_numa_cell_the_shim_redirects() {
        let cpu = "<cpu><numa>\
                     <cell id='0' cpus='0' memory='128' unit='MiB'/>\
                     <cell id='1' cpus='1' memory='32' unit='MiB'/>\
                     <cell id='2' cpus='2' memory='196608' unit='KiB'/>\
                   </numa></cpu>";
        let xml = domain("<memory unit='MiB'>352</memory>", cpu, &[SHIM, PREFIX]);
        let leases = plan(&xml).unwrap().unwrap().leases;
        // The 32 MiB cell is below the shim's 64 MiB minimum: QEMU keeps it anonymous and the
        // shim's numbering skips it.
        assert_eq!(
            leases,
            vec![
                PlannedLease {
                    name: "libvirt/vm1/ram0".into(),
                    size: 128 * MIB
                },
                PlannedLease {
                    name: "libvirt/vm1/ram1".into(),
                    size: 192 * MIB
                },
            ]
        );
        let small = domain(
            "<memory unit='MiB'>352</memory>",
            cpu,
            &[SHIM, PREFIX, ("MEMBROKER_MIN_SIZE", "16M")],
        );
        assert_eq!(plan(&small).unwrap().unwrap().leases.len(), 3);
    }

    #[test]
    fn a_domain_without_the_shim_has_no_plan() {
        let xml = domain("<memory unit='GiB'>4</memory>", "", &[]);
        assert_eq!(plan(&xml).unwrap(), None);
        let plain = "<domain type='kvm'><name>x</name><memory>1024</memory></domain>";
        assert_eq!(plan(plain).unwrap(), None);
    }

    #[test]
    fn the_shim_without_a_prefix_is_refused() {
        let xml = domain("<memory unit='GiB'>4</memory>", "", &[SHIM]);
        let err = plan(&xml).unwrap_err();
        assert!(matches!(err, PlanError::NoPrefix { .. }), "{err}");
        assert!(err.to_string().contains("value='libvirt/vm1'"), "{err}");
    }

    #[test]
    fn the_prefix_must_name_the_domain() {
        let uuid = (
            "MEMBROKER_LEASE_PREFIX",
            "vms/5a1c1d9e-32ad-4a4b-9b2a-4b1f3a6c2d10/",
        );
        let xml = domain("<memory unit='GiB'>1</memory>", "", &[uuid]);
        assert_eq!(
            plan(&xml).unwrap().unwrap().prefix,
            "vms/5a1c1d9e-32ad-4a4b-9b2a-4b1f3a6c2d10"
        );
        let other = ("MEMBROKER_LEASE_PREFIX", "libvirt/vm2");
        let xml = domain("<memory unit='GiB'>1</memory>", "", &[other]);
        let err = plan(&xml).unwrap_err();
        assert!(matches!(err, PlanError::SharedPrefix { .. }), "{err}");
    }

    #[test]
    fn file_backed_ram_and_memory_devices_are_refused() {
        for (backing, what) in [
            (
                "<memoryBacking><hugepages><page size='2' unit='M'/></hugepages></memoryBacking>",
                "<hugepages>",
            ),
            (
                "<memoryBacking><source type='file'/></memoryBacking>",
                "<source type='file'>",
            ),
            (
                "<memoryBacking><access mode='shared'/></memoryBacking>",
                "<access mode='shared'> without <source type='memfd'/>",
            ),
        ] {
            let xml = domain("<memory unit='GiB'>1</memory>", backing, &[SHIM, PREFIX]);
            match plan(&xml) {
                Err(PlanError::FileBacked { what: got }) => assert_eq!(got, what),
                other => panic!("{backing}: {other:?}"),
            }
        }
        let memfd = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>";
        let xml = domain("<memory unit='GiB'>1</memory>", memfd, &[SHIM, PREFIX]);
        assert_eq!(plan(&xml).unwrap().unwrap().leases.len(), 1);

        let dimm = "<maxMemory slots='4' unit='GiB'>4</maxMemory>\
                    <devices><memory model='dimm'><target><size unit='GiB'>1</size></target></memory></devices>";
        let xml = domain("<memory unit='GiB'>2</memory>", dimm, &[SHIM, PREFIX]);
        assert!(matches!(plan(&xml), Err(PlanError::MemoryDevice(m)) if m == "dimm"));
    }

    #[test]
    fn the_dac_label_and_bad_xml() {
        let label = "<seclabel type='static' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel>";
        let d = Domain::parse(&domain("<memory>1024</memory>", label, &[])).unwrap();
        assert_eq!(d.dac_label.as_deref(), Some("+64055:+64055"));
        assert!(matches!(Domain::parse("<domain"), Err(PlanError::Xml(_))));
        assert!(matches!(
            Domain::parse("<domain><name>x</name></domain>"),
            Err(PlanError::Missing("memory"))
        ));
    }

    #[test]
    fn ram_lease_names() {
        let plan = plan(&domain("<memory>1048576</memory>", "", &[PREFIX]))
            .unwrap()
            .unwrap();
        assert!(plan.is_ram_lease("libvirt/vm1/ram0"));
        assert!(plan.is_ram_lease("libvirt/vm1/ram12"));
        for other in [
            "libvirt/vm1/ram",
            "libvirt/vm1/ramx",
            "libvirt/vm1/disk0",
            "libvirt/vm10/ram0",
            "libvirt/vm1/ram0/x",
        ] {
            assert!(!plan.is_ram_lease(other), "{other}");
        }
    }
}
