//! `membroker libvirt-hook`: libvirt's qemu hook (`/etc/libvirt/hooks/qemu` execs it with
//! `DOMAIN OPERATION SUB-OPERATION EXTRA` and the domain XML on stdin).
//!
//! - `prepare begin`: make the leases the shim inside the domain's QEMU will open
//!   (`MEMBROKER_LEASE_PREFIX/ramN`, sized from the domain XML, owned by the user QEMU runs
//!   as), or refuse the start with a message libvirt shows.
//! - `release end`: remove them, unless a managed-save image of the domain waits for them.
//! - everything else (`reconnect` after a libvirtd restart among them): keep them.

mod domain;

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Args;
use membroker_client::proto::LeaseInfo;
use membroker_client::{BindLabel, Client, CreateLease, ErrorCode};

use super::table::id_entries;
use super::{connect, text};
pub use domain::{Domain, Plan, PlanError};

/// The user libvirt runs QEMU as when neither the domain nor qemu.conf says (Debian's).
const DEFAULT_QEMU_USER: &str = "libvirt-qemu";

#[derive(Debug, Args)]
pub struct HookArgs {
    /// The domain's name.
    domain: String,
    /// libvirt's operation: prepare, start, started, stopped, release, migrate, restore,
    /// reconnect or attach.
    operation: String,
    /// begin or end.
    sub_operation: String,
    /// libvirt's extra argument (`-` for most operations).
    extra: Option<String>,
    /// libvirt's QEMU driver configuration, read for the user QEMU runs as.
    #[arg(long, value_name = "PATH", default_value = "/etc/libvirt/qemu.conf")]
    qemu_conf: PathBuf,
    /// Where `virsh managedsave` keeps its images (`NAME.save`): a domain with one keeps its
    /// leases for its restore.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/libvirt/qemu/save")]
    save_dir: PathBuf,
}

pub fn run(socket: &Path, args: HookArgs) -> Result<(), String> {
    // libvirt writes the domain XML for every operation: read it all so its write never fails.
    let mut xml = String::new();
    std::io::stdin().read_to_string(&mut xml).map_err(|e| {
        format!(
            "domain {}: cannot read the domain XML on stdin: {e}",
            args.domain
        )
    })?;
    let op = (args.operation.as_str(), args.sub_operation.as_str());
    if op != ("prepare", "begin") && op != ("release", "end") {
        // Nothing to do, and nothing on stdout: for migrate and restore libvirt would take
        // it as a new domain XML.
        return Ok(());
    }
    let fail = |e: &dyn std::fmt::Display| format!("domain {}: {e}", args.domain);
    let domain = Domain::parse(&xml).map_err(|e| fail(&crate::error::error_chain(&e)))?;
    let Some(plan) = domain.plan().map_err(|e| fail(&e))? else {
        return Ok(());
    };
    let socket = plan.socket.as_deref().map_or(socket, Path::new);
    let mut client = connect(socket).map_err(|e| fail(&e))?;
    if op == ("prepare", "begin") {
        // Missing or unreadable: libvirt's defaults.
        let conf = std::fs::read_to_string(&args.qemu_conf).unwrap_or_default();
        let uid = qemu_uid(&domain, &conf, &args.qemu_conf).map_err(|e| fail(&e))?;
        let label = qemu_label(&domain, &conf, apparmor_enabled());
        prepare(&mut client, &plan, uid, &label).map_err(|e| fail(&e))
    } else if args.save_dir.join(format!("{}.save", domain.name)).exists() {
        Ok(())
    } else {
        release(&mut client, &plan).map_err(|e| fail(&e))
    }
}

/// The uid QEMU runs as: the domain's DAC label, else qemu.conf's `user` (`conf`, read from
/// `qemu_conf`), else libvirt-qemu.
fn qemu_uid(domain: &Domain, conf: &str, qemu_conf: &Path) -> Result<u32, String> {
    let user = match &domain.dac_label {
        Some(label) => label.split(':').next().unwrap_or_default().to_string(),
        None => conf_value(conf, "user").unwrap_or_else(|| DEFAULT_QEMU_USER.to_string()),
    };
    if let Some(number) = user.strip_prefix('+') {
        return number
            .parse()
            .map_err(|_| format!("QEMU's user {user:?} is not a uid"));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    id_entries(&passwd)
        .find(|(name, _)| *name == user)
        .map(|(_, uid)| uid)
        .or_else(|| user.parse().ok())
        .ok_or_else(|| {
            format!(
                "QEMU's user {user:?} (from the domain's DAC label or {}) is not in /etc/passwd",
                qemu_conf.display()
            )
        })
}

/// `KEY = "VALUE"` in qemu.conf, if set.
fn conf_value(conf: &str, key: &str) -> Option<String> {
    conf.lines().find_map(|line| {
        let (k, value) = line.split_once('=')?;
        (k.trim() == key).then(|| value.trim().trim_matches('"').to_string())
    })
}

/// Whether the kernel runs AppArmor, so that libvirt confines each QEMU in its own profile.
fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|v| v.trim() == "Y")
}

/// The security label the domain's QEMU will run under, to bind its leases to: the hook runs
/// under libvirtd's own label, which must not be the one the leases get. libvirt confines each
/// QEMU in the AppArmor profile `libvirt-UUID` (or the domain's static `<label>`) when AppArmor
/// runs and qemu.conf's `security_driver` does not turn it off; otherwise the leases are bound
/// to no label (owner and mode protect them; SELinux's per-domain contexts are not followed).
fn qemu_label(domain: &Domain, conf: &str, apparmor: bool) -> BindLabel {
    let driver = conf_value(conf, "security_driver");
    let driver_allows = driver.as_deref().is_none_or(|d| d.contains("apparmor"));
    let named = |label: String| BindLabel::Named(label);
    match &domain.apparmor {
        Some((kind, _)) if kind == "none" => BindLabel::Unbound,
        Some((_, Some(label))) => named(label.clone()),
        _ if !apparmor || !driver_allows => BindLabel::Unbound,
        _ => match &domain.uuid {
            Some(uuid) => named(format!("libvirt-{uuid}")),
            None => BindLabel::Unbound,
        },
    }
}

/// The shim's leases under the plan's prefix as the broker has them now.
fn current(client: &mut Client, plan: &Plan) -> Result<Vec<LeaseInfo>, String> {
    let all = client.list(&plan.prefix).map_err(|e| text(&e))?;
    Ok(all
        .into_iter()
        .filter(|l| plan.is_ram_lease(&l.name))
        .collect())
}

fn holders(lease: &LeaseInfo) -> String {
    let pids: Vec<String> = lease.holders.iter().map(|h| h.pid.to_string()).collect();
    format!("lease {} is held by pid {}", lease.name, pids.join(", "))
}

/// Makes every planned lease (keeping one that already fits: a restore after a managed save,
/// a start after a crash), removes ram leases the plan no longer has; on failure removes what
/// it made.
fn prepare(client: &mut Client, plan: &Plan, uid: u32, label: &BindLabel) -> Result<(), String> {
    let existing = current(client, plan)?;
    for stale in existing
        .iter()
        .filter(|l| !plan.leases.iter().any(|p| p.name == l.name))
    {
        if !stale.holders.is_empty() {
            return Err(format!("{}: is QEMU still running?", holders(stale)));
        }
        client.remove(&stale.name).map_err(|e| text(&e))?;
    }
    let mut made = Vec::new();
    for planned in &plan.leases {
        let old = existing.iter().find(|l| l.name == planned.name);
        let bound = match label {
            BindLabel::Named(name) => Some(name.as_str()),
            _ => None,
        };
        let fits = |l: &LeaseInfo| {
            l.uid == uid
                && l.label.as_deref() == bound
                && l.size == planned.size
                && plan.page_size.is_none_or(|p| p == l.page_size)
                && plan.pool.as_ref().is_none_or(|p| *p == l.pool)
        };
        match old {
            Some(l) if fits(l) => continue,
            Some(l) if !l.holders.is_empty() => {
                undo(client, &made);
                return Err(format!("{}: is QEMU still running?", holders(l)));
            }
            Some(l) => client.remove(&l.name).map_err(|e| text(&e))?,
            None => {}
        }
        let mut req = CreateLease::new(planned.name.clone(), planned.size)
            .persistent(true)
            .mode(0o600)
            .label(label.clone());
        req.owner = Some(uid);
        req.page_size = plan.page_size;
        req.pool = plan.pool.clone();
        if let Err(e) = client.create(req) {
            undo(client, &made);
            return Err(format!(
                "its guest RAM needs {}: {}",
                plan.describe(),
                text(&e)
            ));
        }
        made.push(planned.name.clone());
    }
    Ok(())
}

/// Removes the leases a failed prepare made, best effort: the failure being reported is
/// the one the operator must see.
fn undo(client: &mut Client, made: &[String]) {
    for name in made {
        if let Err(e) = client.remove(name) {
            eprintln!(
                "membroker: could not remove lease {name} again: {}",
                text(&e)
            );
        }
    }
}

/// Removes the domain's ram leases (the broker removes the automatic directories above them
/// once empty).
fn release(client: &mut Client, plan: &Plan) -> Result<(), String> {
    for lease in current(client, plan)? {
        match client.remove(&lease.name) {
            Err(e) if e.code() != Some(ErrorCode::NotFound) => return Err(text(&e)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_conf_user() {
        let conf = "#user = \"qemu\"\n# user = \"+0\"\nuser = \"libvirt-qemu\"\ngroup = \"kvm\"\n";
        assert_eq!(conf_value(conf, "user").as_deref(), Some("libvirt-qemu"));
        assert_eq!(conf_value("#user = \"libvirt-qemu\"\n", "user"), None);
    }

    #[test]
    fn qemu_uid_from_the_dac_label_first() {
        let xml = "<domain><name>d</name><memory>1024</memory>\
                   <seclabel model='dac'><label>+4242:+4242</label></seclabel></domain>";
        let d = Domain::parse(xml).unwrap();
        assert_eq!(qemu_uid(&d, "", Path::new("/nonexistent")), Ok(4242));
        let root = Domain::parse(&xml.replace("+4242:+4242", "root:root")).unwrap();
        assert_eq!(qemu_uid(&root, "", Path::new("/nonexistent")), Ok(0));
    }

    #[test]
    fn leases_are_bound_to_the_label_qemu_will_run_under() {
        let uuid = "5a1c1d9e-32ad-4a4b-9b2a-4b1f3a6c2d10";
        let xml = |seclabel: &str| {
            format!(
                "<domain><name>d</name><uuid>{uuid}</uuid><memory>1024</memory>{seclabel}</domain>"
            )
        };
        let plain = Domain::parse(&xml("")).unwrap();
        let per_domain = BindLabel::Named(format!("libvirt-{uuid}"));
        // AppArmor on: libvirt's per-domain profile, never the hook's own (libvirtd's) label.
        assert_eq!(qemu_label(&plain, "", true), per_domain);
        assert_eq!(
            qemu_label(&plain, "security_driver = \"apparmor\"\n", true),
            per_domain
        );
        // No AppArmor, or libvirt told not to use it: bound to no label.
        assert_eq!(qemu_label(&plain, "", false), BindLabel::Unbound);
        assert_eq!(
            qemu_label(&plain, "security_driver = \"none\"\n", true),
            BindLabel::Unbound
        );
        // The domain's own word wins.
        let none = Domain::parse(&xml("<seclabel type='none' model='apparmor'/>")).unwrap();
        assert_eq!(qemu_label(&none, "", true), BindLabel::Unbound);
        let fixed = Domain::parse(&xml(
            "<seclabel type='static' model='apparmor'><label>vm-profile</label></seclabel>",
        ))
        .unwrap();
        assert_eq!(
            qemu_label(&fixed, "", true),
            BindLabel::Named("vm-profile".into())
        );
    }
}
