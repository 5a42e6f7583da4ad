//! Quotas: the operator's limits on how many bytes and leases a uid or a group may own.
//!
//! A lease counts against its owner uid and its group (the lease's gid) from the moment a
//! create is reserved until its memory goes back to the pool, restored leases included. A
//! uid's limit is its own rule (`uid:N:...`) or else the `default:` rule; uid 0 only has the
//! limits named for it. A group's limit is its `gid:` rule, shared by all the group's leases.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use membroker_client::proto::QuotaInfo;
use membroker_client::size::{format_size, parse_size};

/// Whom a quota rule limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    Uid(u32),
    Gid(u32),
    /// Every uid but root without a rule of its own, each on its own.
    Default,
}

/// A limit on bytes, on leases, or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    pub bytes: Option<u64>,
    pub leases: Option<u64>,
}

/// One operator rule: `uid:1000:bytes=8G,leases=16`, `gid:kvm:bytes=64G`, `default:leases=4`.
/// A group is kept by name until `membroker serve` resolves it (the namespace does no I/O).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaSpec {
    pub scope: SpecScope,
    pub limit: Limit,
}

/// Whom a rule names, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecScope {
    Uid(u32),
    Group(String),
    Default,
}

impl FromStr for QuotaSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<QuotaSpec, String> {
        let usage = "use uid:UID:LIMITS, gid:GROUP:LIMITS or default:LIMITS, LIMITS being \
                     bytes=SIZE and/or leases=N separated by a comma";
        let bad = |what: String| format!("quota {spec:?}: {what}; {usage}");
        let (scope, limits) = match spec.split_once(':') {
            Some(("default", limits)) => (SpecScope::Default, limits),
            Some((kind @ ("uid" | "gid"), rest)) => {
                let (who, limits) = rest
                    .split_once(':')
                    .ok_or_else(|| bad(format!("no limits after the {kind}")))?;
                let scope = match kind {
                    "uid" => SpecScope::Uid(
                        who.parse()
                            .map_err(|_| bad(format!("uid {who:?} is not a number")))?,
                    ),
                    _ if who.is_empty() => return Err(bad("no group".into())),
                    _ => SpecScope::Group(who.to_string()),
                };
                (scope, limits)
            }
            _ => return Err(bad("unknown scope".into())),
        };
        let mut limit = Limit::default();
        for item in limits.split(',') {
            match item.split_once('=') {
                Some(("bytes", size)) => {
                    limit.bytes =
                        Some(parse_size(size).map_err(|e| bad(format!("bytes={size}: {e}")))?);
                }
                Some(("leases", n)) => {
                    limit.leases = Some(
                        n.parse()
                            .map_err(|_| bad(format!("leases={n} is not a number")))?,
                    );
                }
                _ => return Err(bad(format!("unknown limit {item:?}"))),
            }
        }
        Ok(QuotaSpec { scope, limit })
    }
}

/// Bytes and leases counted against a uid or a group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage {
    bytes: u64,
    leases: u64,
}

/// The quota rules and what every uid and group uses.
#[derive(Debug, Default)]
pub struct Quotas {
    /// In the operator's order.
    rules: Vec<(Subject, Limit)>,
    /// Each subject's rule (its last), so that looking one up does not walk thousands.
    latest: HashMap<Subject, Limit>,
    /// Names of groups for messages (`kvm`), by gid.
    group_names: HashMap<u32, String>,
    uids: HashMap<u32, Usage>,
    gids: HashMap<u32, Usage>,
}

/// A create a quota refuses: the message says which quota, what is used and what was asked.
pub fn refusal(name: &str, quota: &str, limit: &str, used: &str, asked: &str) -> String {
    format!("lease {name}: quota of {quota} is {limit}, {used} used, {asked} asked")
}

impl Quotas {
    /// Quotas with these rules (later rules for the same subject win); `group_names` labels
    /// the groups in messages.
    pub fn new(rules: Vec<(Subject, Limit)>, group_names: HashMap<u32, String>) -> Quotas {
        Quotas {
            latest: rules.iter().copied().collect(),
            rules,
            group_names,
            ..Quotas::default()
        }
    }

    /// Takes `other`'s rules and group names, keeping the usage counted so far.
    pub fn set_rules(&mut self, other: Quotas) {
        self.rules = other.rules;
        self.latest = other.latest;
        self.group_names = other.group_names;
    }

    fn rule(&self, subject: Subject) -> Option<Limit> {
        self.latest.get(&subject).copied()
    }

    /// A uid's limit and whether it is the default's.
    fn uid_limit(&self, uid: u32) -> Option<(Limit, bool)> {
        match self.rule(Subject::Uid(uid)) {
            Some(limit) => Some((limit, false)),
            None if uid == 0 => None,
            None => self.rule(Subject::Default).map(|l| (l, true)),
        }
    }

    fn label(&self, subject: Subject) -> String {
        match subject {
            Subject::Uid(uid) => format!("uid {uid}"),
            Subject::Gid(gid) => match self.group_names.get(&gid) {
                Some(name) => format!("group {name} (gid {gid})"),
                None => format!("gid {gid}"),
            },
            Subject::Default => "default".into(),
        }
    }

    /// Whether a lease of `size` bytes owned by `uid` and `gid` fits; the refusal's text if not.
    pub fn admit(&self, name: &str, uid: u32, gid: u32, size: u64) -> Result<(), String> {
        let uid_rule = self.uid_limit(uid).map(|(l, _)| (Subject::Uid(uid), l));
        let gid_rule = self.rule(Subject::Gid(gid)).map(|l| (Subject::Gid(gid), l));
        for (subject, limit) in uid_rule.into_iter().chain(gid_rule) {
            let used = self.usage(subject);
            let label = self.label(subject);
            if let Some(max) = limit.bytes
                && used.bytes.saturating_add(size) > max
            {
                return Err(refusal(
                    name,
                    &label,
                    &format_size(max),
                    &format_size(used.bytes),
                    &format_size(size),
                ));
            }
            if let Some(max) = limit.leases
                && used.leases >= max
            {
                return Err(refusal(
                    name,
                    &label,
                    &format!("{max} leases"),
                    &used.leases.to_string(),
                    "1 more",
                ));
            }
        }
        Ok(())
    }

    fn usage(&self, subject: Subject) -> Usage {
        let map = match subject {
            Subject::Uid(uid) => self.uids.get(&uid),
            Subject::Gid(gid) => self.gids.get(&gid),
            Subject::Default => None,
        };
        map.copied().unwrap_or_default()
    }

    /// A lease of `size` owned by `uid` and `gid` now counts.
    pub fn charge(&mut self, uid: u32, gid: u32, size: u64) {
        for usage in [
            self.uids.entry(uid).or_default(),
            self.gids.entry(gid).or_default(),
        ] {
            usage.bytes += size;
            usage.leases += 1;
        }
    }

    /// A lease counted by [`Quotas::charge`] is gone (or its create failed).
    pub fn credit(&mut self, uid: u32, gid: u32, size: u64) {
        for usage in [
            self.uids.entry(uid).or_default(),
            self.gids.entry(gid).or_default(),
        ] {
            usage.bytes = usage.bytes.saturating_sub(size);
            usage.leases = usage.leases.saturating_sub(1);
        }
    }

    fn info(&self, subject: Subject, limit: Limit, default: bool) -> QuotaInfo {
        let used = self.usage(subject);
        let (scope, id) = match subject {
            Subject::Uid(uid) => ("uid", uid),
            Subject::Gid(gid) => ("gid", gid),
            Subject::Default => ("default", 0),
        };
        QuotaInfo {
            scope: scope.into(),
            id,
            label: self.label(subject),
            default,
            bytes_limit: limit.bytes,
            leases_limit: limit.leases,
            bytes_used: used.bytes,
            leases_used: used.leases,
        }
    }

    /// Every quota with its usage (an admin's view): each uid and group rule, and each uid the
    /// default rule limits that owns something. Without `all`, only the quotas that limit
    /// `uid` and `gid`.
    pub fn view(&self, uid: u32, gid: u32, all: bool) -> Vec<QuotaInfo> {
        let mut out = Vec::new();
        let mut subjects: Vec<Subject> = Vec::new();
        if all {
            subjects.extend(self.rules.iter().map(|(s, _)| *s));
            let mut owners: Vec<u32> = self
                .uids
                .iter()
                .filter(|(_, u)| u.leases > 0)
                .map(|(uid, _)| *uid)
                .collect();
            owners.sort_unstable();
            subjects.extend(owners.into_iter().map(Subject::Uid));
        } else {
            subjects.extend([Subject::Uid(uid), Subject::Gid(gid)]);
        }
        let mut seen = HashSet::new();
        for subject in subjects {
            if !seen.insert(subject) {
                continue;
            }
            match subject {
                Subject::Uid(uid) => {
                    if let Some((limit, default)) = self.uid_limit(uid) {
                        out.push(self.info(subject, limit, default));
                    }
                }
                Subject::Gid(_) => {
                    if let Some(limit) = self.rule(subject) {
                        out.push(self.info(subject, limit, false));
                    }
                }
                Subject::Default => {
                    if let Some(limit) = self.rule(subject) {
                        out.push(self.info(subject, limit, true));
                    }
                }
            }
        }
        out
    }

    /// [`Quotas::view`] in `(scope, id)` order (uids, then groups, then the default rule),
    /// the quotas after `after` as long as `fits` says they fit; and whether more follow.
    pub fn page(
        &self,
        uid: u32,
        gid: u32,
        all: bool,
        after: Option<&(String, u32)>,
        fits: impl FnMut(&QuotaInfo) -> bool,
    ) -> (Vec<QuotaInfo>, bool) {
        let mut view = self.view(uid, gid, all);
        view.sort_by_key(|q| order(&q.scope, q.id));
        let rest = view
            .into_iter()
            .filter(|q| after.is_none_or(|(scope, id)| order(&q.scope, q.id) > order(scope, *id)));
        super::name::page(rest, fits)
    }
}

/// Where a quota of `scope` and `id` goes in a listing: uids, then groups, then the default
/// rule (a scope this broker does not know, after them all).
fn order(scope: &str, id: u32) -> (u8, u32) {
    let rank = match scope {
        "uid" => 0,
        "gid" => 1,
        "default" => 2,
        _ => 3,
    };
    (rank, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    #[test]
    fn parses_rules() {
        let q: QuotaSpec = "uid:1000:bytes=8G,leases=16".parse().unwrap();
        assert_eq!(q.scope, SpecScope::Uid(1000));
        assert_eq!(
            q.limit,
            Limit {
                bytes: Some(8 * G),
                leases: Some(16)
            }
        );
        let q: QuotaSpec = "gid:kvm:leases=2".parse().unwrap();
        assert_eq!(q.scope, SpecScope::Group("kvm".into()));
        let q: QuotaSpec = "default:bytes=1G".parse().unwrap();
        assert_eq!(q.scope, SpecScope::Default);
        for bad in [
            "uid:x:bytes=1G",
            "uid:1000",
            "nobody:bytes=1G",
            "default:size=1G",
        ] {
            assert!(bad.parse::<QuotaSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn refusal_names_the_quota_usage_and_ask() {
        let rules = vec![(
            Subject::Uid(1000),
            Limit {
                bytes: Some(8 * G),
                leases: None,
            },
        )];
        let mut q = Quotas::new(rules, HashMap::new());
        q.charge(1000, 100, 7 * G + G / 2);
        assert_eq!(
            q.admit("x", 1000, 100, G).unwrap_err(),
            "lease x: quota of uid 1000 is 8 GiB, 7.5 GiB used, 1 GiB asked"
        );
        assert!(q.admit("x", 1000, 100, G / 2).is_ok());
        q.credit(1000, 100, 7 * G + G / 2);
        assert!(q.admit("x", 1000, 100, 8 * G).is_ok());
    }

    #[test]
    fn default_limits_each_uid_but_root_and_groups_share() {
        let one = Limit {
            bytes: None,
            leases: Some(1),
        };
        let names = HashMap::from([(100, "kvm".to_string())]);
        let mut q = Quotas::new(
            vec![
                (Subject::Default, one),
                (
                    Subject::Gid(100),
                    Limit {
                        bytes: None,
                        leases: Some(2),
                    },
                ),
            ],
            names,
        );
        q.charge(1000, 100, G);
        assert!(q.admit("a", 1000, 7, G).is_err(), "default: one lease");
        assert!(q.admit("a", 1001, 7, G).is_ok(), "another uid, its own");
        assert!(
            q.admit("a", 0, 100, G).is_ok(),
            "root is not limited by default"
        );
        q.charge(1001, 100, G);
        let err = q.admit("a", 0, 100, G).unwrap_err();
        assert_eq!(
            err,
            "lease a: quota of group kvm (gid 100) is 2 leases, 2 used, 1 more asked"
        );
        let mine = q.view(1000, 100, false);
        assert_eq!(mine.len(), 2);
        assert!(mine[0].default && mine[0].leases_used == 1);
        assert_eq!(mine[1].leases_used, 2);
        assert_eq!(
            q.view(0, 0, true).len(),
            4,
            "default, kvm, uid 1000, uid 1001"
        );
    }

    #[test]
    fn pages_go_on_after_their_last_quota_in_scope_order() {
        let limit = Limit {
            bytes: None,
            leases: Some(1),
        };
        let rules = vec![
            (Subject::Default, limit),
            (Subject::Gid(100), limit),
            (Subject::Uid(1002), limit),
            (Subject::Uid(1000), limit),
        ];
        let mut q = Quotas::new(rules, HashMap::new());
        q.charge(1001, 100, G);
        let key = |q: &QuotaInfo| (q.scope.clone(), q.id);
        let (mut all, mut after) = (Vec::new(), None);
        loop {
            let mut room = 2;
            let (page, more) = q.page(0, 0, true, after.as_ref(), |_| {
                room -= 1;
                room >= 0
            });
            assert!(page.len() <= 2);
            after = page.last().map(key);
            all.extend(page);
            if !more {
                break;
            }
        }
        let labels: Vec<&str> = all.iter().map(|q| q.label.as_str()).collect();
        assert_eq!(
            labels,
            ["uid 1000", "uid 1001", "uid 1002", "gid 100", "default"]
        );
        assert!(all[1].default, "uid 1001 is limited by the default rule");
        let mine = q.page(1002, 100, false, None, |_| true).0;
        assert_eq!(
            mine.iter().map(key).collect::<Vec<_>>(),
            [("uid".to_string(), 1002), ("gid".to_string(), 100)]
        );
    }
}
