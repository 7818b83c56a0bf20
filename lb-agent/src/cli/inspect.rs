//! `lb-agent inspect services|backends|conntrack|stats`: what the pinned
//! maps hold, as a table or `--json`, with each frontend's owning Service
//! and type. A live walk of the maps: one taken mid-update can miss entries
//! written during it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::Path,
};

use lb_common::{
    affinity::AFFINITY_MATCH_MAP,
    backend::BACKEND_MAP,
    ct::{is_closing, CtKey, CtValue, CT_ASSURED, CT_DIR_FORWARD, CT_SEEN_REPLY, CT_SNAT},
    revnat::REVNAT_MAP,
    source_range::SOURCE_RANGE_MAP,
    svc::{SvcValue, SVC_MAP},
};
use serde::Serialize;

use crate::{
    cli::dump,
    datapath::{
        conntrack::{flow_is_expired, monotonic_ns, CtAddr},
        counters as datapath_counters,
        loader::{open_conntrack, open_conntrack6, open_pinned, MapSizes},
        maps::{FamilyMaps, KernelMaps, LbMaps, Snapshot, SourceRangeMaps, Wire},
    },
    model::{FrontendKind, L4Addr, Proto},
};

/// Which entries to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `namespace/name` of the owning Service.
    pub service: Option<String>,
    /// A backend address.
    pub backend: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// An agent from before IPv6 pinned the IPv4 maps alone (the layout is
    /// the same; the IPv6 maps appear when an agent of this version starts).
    #[error(
        "{0}: pinned by an lb-agent without IPv6 maps (an older version still running?): \
         inspect it with that version's lb-agent, or upgrade the agent (its pins are kept)"
    )]
    WithoutIpv6(String),
}

/// The service maps, read once.
pub fn snapshot(pin_dir: &Path) -> anyhow::Result<Snapshot> {
    if pin_dir.join(SVC_MAP).exists() && !pin_dir.join(lb_common::svc::SVC6_MAP).exists() {
        return Err(InspectError::WithoutIpv6(pin_dir.display().to_string()).into());
    }
    let family = |svc, backends, revnat| -> anyhow::Result<FamilyMaps> {
        Ok(FamilyMaps {
            svc: open_pinned(pin_dir, svc)?,
            backends: open_pinned(pin_dir, backends)?,
            revnat: open_pinned(pin_dir, revnat)?,
        })
    };
    let maps = KernelMaps::new(
        family(SVC_MAP, BACKEND_MAP, REVNAT_MAP)?,
        family(
            lb_common::svc::SVC6_MAP,
            lb_common::backend::BACKEND6_MAP,
            lb_common::revnat::REVNAT6_MAP,
        )?,
        open_pinned(pin_dir, AFFINITY_MATCH_MAP)?,
        SourceRangeMaps {
            v4: open_pinned(pin_dir, SOURCE_RANGE_MAP)?,
            v6: open_pinned(pin_dir, lb_common::source_range::SOURCE_RANGE6_MAP)?,
        },
        open_pinned(pin_dir, lb_common::maglev::MAGLEV_MAP)?,
        MapSizes::default().capacity(),
    )?;
    Ok(maps.snapshot()?)
}

/// The services table (`dump`'s format, shared with `check` and the golden tests).
pub fn services(pin_dir: &Path) -> anyhow::Result<String> {
    services_text(&snapshot(pin_dir)?, &Filter::default())
}

pub fn services_text(snapshot: &Snapshot, filter: &Filter) -> anyhow::Result<String> {
    let text = dump::services(&filtered(snapshot, filter));
    Ok(if text.is_empty() {
        "(no services)\n".into()
    } else {
        text
    })
}

/// One frontend as `inspect services --json` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FrontendInfo {
    pub frontend: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// `namespace/name`, as stored with the frontend's reverse-NAT entry.
    pub service: Option<String>,
    pub rev_nat_id: u16,
    /// This node's backends are the first `local_backends` slots.
    pub local_backends: u16,
    pub external_traffic_policy_local: bool,
    pub internal_traffic_policy_local: bool,
    /// ClientIP affinity timeout (None: no affinity).
    pub affinity_timeout_s: Option<u32>,
    pub source_ranges: Vec<String>,
    /// The size of its Maglev table (None: `--lb-algorithm random`).
    pub maglev_table_size: Option<u32>,
    pub backends: Vec<SlotInfo>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot: u16,
    pub backend_id: u32,
    pub address: Option<IpAddr>,
    pub port: Option<u16>,
    pub local: bool,
}

pub fn frontends(snapshot: &Snapshot, filter: &Filter) -> Vec<FrontendInfo> {
    let snapshot = filtered(snapshot, filter);
    heads(&snapshot)
        .map(|(frontend, head)| frontend_info(&snapshot, frontend, head))
        .collect()
}

fn heads(snapshot: &Snapshot) -> impl Iterator<Item = (L4Addr, &SvcValue)> {
    snapshot
        .slots
        .iter()
        .filter(|((_, slot), _)| *slot == 0)
        .map(|((frontend, _), head)| (*frontend, head))
}

fn frontend_info(snapshot: &Snapshot, frontend: L4Addr, head: &SvcValue) -> FrontendInfo {
    use lb_common::svc::*;
    let owner = owner(snapshot, frontend, head.rev_nat_id);
    let backends = (1..=head.count)
        .filter_map(|slot| {
            let value = snapshot.slots.get(&(frontend, slot))?;
            let backend = snapshot.backends.get(&value.backend_id);
            Some(SlotInfo {
                slot,
                backend_id: value.backend_id,
                address: backend.map(|b| b.addr),
                port: backend.map(|b| b.port),
                local: !value.slot_is_remote(slot, head.local_count),
            })
        })
        .collect();
    FrontendInfo {
        frontend: frontend.to_string(),
        address: frontend.addr,
        port: frontend.port,
        protocol: frontend.proto.to_string(),
        kind: FrontendKind::of_flags(head.flags).map(|k| k.name().to_owned()),
        service: owner,
        rev_nat_id: head.rev_nat_id,
        local_backends: head.local_count,
        external_traffic_policy_local: head.flags & SVC_FLAG_EXTERNAL_LOCAL != 0,
        internal_traffic_policy_local: head.flags & SVC_FLAG_INTERNAL_LOCAL != 0,
        affinity_timeout_s: (head.flags & SVC_FLAG_AFFINITY != 0)
            .then_some(head.affinity_timeout_s),
        source_ranges: snapshot
            .source_ranges
            .iter()
            .filter(|(id, _)| *id == head.rev_nat_id)
            .map(|(_, range)| range.to_string())
            .collect(),
        maglev_table_size: (head.flags & SVC_FLAG_MAGLEV != 0).then_some(head.maglev_table_size),
        backends,
    }
}

/// The Service a frontend's reverse-NAT entry names, if it matches.
fn owner(snapshot: &Snapshot, frontend: L4Addr, rev_nat_id: u16) -> Option<String> {
    snapshot
        .revnat
        .get(&rev_nat_id)
        .filter(|r| r.frontend == frontend)
        .and_then(|r| r.owner.as_ref())
        .map(ToString::to_string)
}

/// Only the frontends of the filter's Service, or those using its backend.
fn filtered(snapshot: &Snapshot, filter: &Filter) -> Snapshot {
    if filter.service.is_none() && filter.backend.is_none() {
        return snapshot.clone();
    }
    let keep: BTreeSet<L4Addr> = heads(snapshot)
        .filter(|(frontend, head)| {
            let service_ok = filter.service.as_ref().is_none_or(|wanted| {
                owner(snapshot, *frontend, head.rev_nat_id).as_ref() == Some(wanted)
            });
            let backend_ok = filter.backend.is_none_or(|wanted| {
                (1..=head.count).any(|slot| {
                    snapshot
                        .slots
                        .get(&(*frontend, slot))
                        .and_then(|v| snapshot.backends.get(&v.backend_id))
                        .is_some_and(|b| b.addr == wanted)
                })
            });
            service_ok && backend_ok
        })
        .map(|(frontend, _)| frontend)
        .collect();
    let mut out = snapshot.clone();
    out.slots.retain(|(frontend, _), _| keep.contains(frontend));
    out
}

/// One backend as `inspect backends` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BackendInfo {
    pub backend_id: u32,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// The frontends with a slot on it.
    pub frontends: Vec<String>,
    pub services: Vec<String>,
}

pub fn backends(snapshot: &Snapshot, filter: &Filter) -> Vec<BackendInfo> {
    let mut users: BTreeMap<u32, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for info in frontends(snapshot, &Filter::default()) {
        for slot in &info.backends {
            let entry = users.entry(slot.backend_id).or_default();
            entry.0.insert(info.frontend.clone());
            entry.1.extend(info.service.clone());
        }
    }
    snapshot
        .backends
        .iter()
        .filter(|(_, b)| filter.backend.is_none_or(|wanted| b.addr == wanted))
        .map(|(id, b)| {
            let (frontends, services) = users.remove(id).unwrap_or_default();
            BackendInfo {
                backend_id: *id,
                address: b.addr,
                port: b.port,
                protocol: b.proto.to_string(),
                frontends: frontends.into_iter().collect(),
                services: services.into_iter().collect(),
            }
        })
        .filter(|b| {
            filter
                .service
                .as_ref()
                .is_none_or(|wanted| b.services.contains(wanted))
        })
        .collect()
}

pub fn backends_text(backends: &[BackendInfo]) -> String {
    let mut out = format!(
        "{:>6} {:<26} {:<30} FRONTENDS\n",
        "ID", "BACKEND", "SERVICES"
    );
    for b in backends {
        let _ = writeln!(
            out,
            "{:>6} {:<26} {:<30} {}",
            b.backend_id,
            format!("{}:{}/{}", b.address, b.port, b.protocol),
            if b.services.is_empty() {
                "-".to_owned()
            } else {
                b.services.join(",")
            },
            b.frontends.join(" ")
        );
    }
    let _ = writeln!(out, "({} backends)", backends.len());
    out
}

/// One tracked flow (its forward entry) as `inspect conntrack` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FlowInfo {
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The node address and port the flow was SNATed to, if it was.
    pub snat: Option<String>,
    pub service: Option<String>,
    pub age_s: f64,
    pub expires_in_s: f64,
    /// opening (no answer yet), answered (not yet assured), assured,
    /// closing or expired.
    pub state: &'static str,
}

impl FlowInfo {
    /// Rows in a stable order: protocol, client, frontend.
    fn sort_key(&self) -> (&str, &str, &str) {
        (&self.protocol, &self.client, &self.frontend)
    }
}

/// Forward conntrack entries, both families': one per tracked flow.
pub fn flows(
    pin_dir: &Path,
    snapshot: &Snapshot,
    filter: &Filter,
) -> anyhow::Result<Vec<FlowInfo>> {
    let now = monotonic_ns();
    let mut rows = Vec::new();
    family_flows(
        open_conntrack(pin_dir)?.entries()?,
        snapshot,
        filter,
        now,
        &mut rows,
    );
    family_flows(
        open_conntrack6(pin_dir)?.entries()?,
        snapshot,
        filter,
        now,
        &mut rows,
    );
    rows.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    Ok(rows)
}

/// One family's tracked flows, as `flows` shows them.
fn family_flows<A: CtAddr>(
    entries: BTreeMap<CtKey<A>, CtValue<A>>,
    snapshot: &Snapshot,
    filter: &Filter,
    now: u64,
    rows: &mut Vec<FlowInfo>,
) {
    for (&key, &value) in &entries {
        if key.dir != CT_DIR_FORWARD {
            continue;
        }
        let backend_addr = value.dst_addr.ip();
        if filter.backend.is_some_and(|wanted| wanted != backend_addr) {
            continue;
        }
        let service = snapshot
            .revnat
            .get(&value.rev_nat_id)
            .and_then(|r| r.owner.as_ref())
            .map(ToString::to_string);
        if filter
            .service
            .as_ref()
            .is_some_and(|wanted| service.as_ref() != Some(wanted))
        {
            continue;
        }
        let peer = entries.get(&key.peer_key(&value)).copied();
        let state = if flow_is_expired(&value, peer.as_ref(), now) {
            "expired"
        } else if is_closing(value.flags) {
            "closing"
        } else if value.flags & CT_SEEN_REPLY == 0 {
            "opening"
        } else if value.flags & CT_ASSURED == 0 {
            "answered"
        } else {
            "assured"
        };
        let expires = peer.map_or(value.expires_ns, |p| p.expires_ns.max(value.expires_ns));
        rows.push(FlowInfo {
            protocol: Proto::from_number(key.proto)
                .map_or_else(|| key.proto.to_string(), |p| p.to_string()),
            client: endpoint(key.saddr, key.sport),
            frontend: endpoint(key.daddr, key.dport),
            backend: endpoint(value.dst_addr, value.dst_port),
            snat: (value.flags & CT_SNAT != 0).then(|| endpoint(value.src_addr, value.src_port)),
            service,
            age_s: now.saturating_sub(value.created_ns) as f64 / 1e9,
            expires_in_s: expires.saturating_sub(now) as f64 / 1e9,
            state,
        });
    }
}

pub fn flows_text(flows: &[FlowInfo]) -> String {
    let mut flows: Vec<&FlowInfo> = flows.iter().collect();
    flows.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    let mut out = format!(
        "{:<4} {:<22} {:<22} {:<22} {:>8} {:>8} {:<8} {:<22} SERVICE\n",
        "PROT", "CLIENT", "FRONTEND", "BACKEND", "AGE(s)", "TTL(s)", "STATE", "SNAT"
    );
    for f in &flows {
        let _ = writeln!(
            out,
            "{:<4} {:<22} {:<22} {:<22} {:>8.1} {:>8.1} {:<8} {:<22} {}",
            f.protocol,
            f.client,
            f.frontend,
            f.backend,
            f.age_s,
            f.expires_in_s,
            f.state,
            f.snat.as_deref().unwrap_or("-"),
            f.service.as_deref().unwrap_or("-"),
        );
    }
    let _ = writeln!(out, "({} flows)", flows.len());
    out
}

/// Forward conntrack entries as a table.
pub fn conntrack(pin_dir: &Path) -> anyhow::Result<String> {
    let snapshot = snapshot(pin_dir)?;
    Ok(flows_text(&flows(pin_dir, &snapshot, &Filter::default())?))
}

/// Per-reason packet counters, summed over CPUs, as a table.
pub fn stats(pin_dir: &Path) -> anyhow::Result<String> {
    let mut out = String::new();
    for (name, value) in counters(pin_dir)? {
        let _ = writeln!(out, "{name:<22} {value}");
    }
    Ok(out)
}

pub fn counters(pin_dir: &Path) -> anyhow::Result<Vec<(&'static str, u64)>> {
    Ok(datapath_counters::sum(&datapath_counters::open(pin_dir)?)?)
}

fn endpoint<A: Wire>(addr: A, port: u16) -> String {
    std::net::SocketAddr::new(addr.ip(), port).to_string()
}
