//! `lb-agent inspect`: services, conntrack and counters, read from the pinned maps.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, MapData, PerCpuArray};
use lb_common::{
    affinity::AFFINITY_MATCH_MAP,
    backend::BACKEND_MAP,
    ct::{is_closing, CtKey, CtValue, CT_DIR_FORWARD, CT_MAP, CT_SEEN_REPLY, CT_SNAT},
    revnat::REVNAT_MAP,
    stats::{STATS_MAP, STAT_COUNT, STAT_NAMES},
    svc::SVC_MAP,
};

use crate::{
    datapath::{
        conntrack::{flow_is_expired, monotonic_ns},
        loader::{open_pinned, MapSizes},
        maps::{KernelMaps, LbMaps},
    },
    dump,
    model::Proto,
};

pub fn services(pin_dir: &Path) -> anyhow::Result<String> {
    let maps = KernelMaps::new(
        open_pinned(pin_dir, SVC_MAP)?,
        open_pinned(pin_dir, BACKEND_MAP)?,
        open_pinned(pin_dir, REVNAT_MAP)?,
        open_pinned(pin_dir, AFFINITY_MATCH_MAP)?,
        open_pinned(pin_dir, lb_common::source_range::SOURCE_RANGE_MAP)?,
        MapSizes::default().capacity(),
    )?;
    let text = dump::services(&maps.snapshot()?);
    Ok(if text.is_empty() {
        "(no services)\n".into()
    } else {
        text
    })
}

/// Forward conntrack entries: one line per tracked flow.
pub fn conntrack(pin_dir: &Path) -> anyhow::Result<String> {
    let map: HashMap<MapData, CtKey, CtValue> = open_pinned(pin_dir, CT_MAP)?.try_into()?;
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for entry in map.iter() {
        let (key, value) = entry?;
        if key.dir != CT_DIR_FORWARD {
            continue;
        }
        let proto =
            Proto::from_number(key.proto).map_or_else(|| key.proto.to_string(), |p| p.to_string());
        let peer = map.get(&key.peer_key(&value), 0).ok();
        let state = if flow_is_expired(&value, peer.as_ref(), now) {
            "expired"
        } else if is_closing(value.flags) {
            "closing"
        } else if value.flags & CT_SEEN_REPLY == 0 {
            "opening"
        } else {
            "live"
        };
        let expires = peer.map_or(value.expires_ns, |p| p.expires_ns.max(value.expires_ns));
        let snat = if value.flags & CT_SNAT != 0 {
            endpoint(value.src_addr_be, value.src_port_be)
        } else {
            "-".into()
        };
        rows.push(format!(
            "{proto:<4} {:<22} {:<22} {:<22} {:>8.1} {:>8.1} {state:<8} {snat}",
            endpoint(key.saddr_be, key.sport_be),
            endpoint(key.daddr_be, key.dport_be),
            endpoint(value.dst_addr_be, value.dst_port_be),
            now.saturating_sub(value.created_ns) as f64 / 1e9,
            expires.saturating_sub(now) as f64 / 1e9,
        ));
    }
    rows.sort();
    let mut out = format!(
        "{:<4} {:<22} {:<22} {:<22} {:>8} {:>8} {:<8} SNAT\n",
        "PROT", "CLIENT", "FRONTEND", "BACKEND", "AGE(s)", "TTL(s)", "STATE"
    );
    for row in &rows {
        let _ = writeln!(out, "{row}");
    }
    let _ = writeln!(out, "({} flows)", rows.len());
    Ok(out)
}

/// Per-reason packet counters, summed over CPUs.
pub fn stats(pin_dir: &Path) -> anyhow::Result<String> {
    let mut out = String::new();
    for (name, value) in counters(pin_dir)? {
        let _ = writeln!(out, "{name:<22} {value}");
    }
    Ok(out)
}

pub fn counters(pin_dir: &Path) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let map: PerCpuArray<MapData, u64> = open_pinned(pin_dir, STATS_MAP)?.try_into()?;
    (0..STAT_COUNT)
        .map(|i| Ok((STAT_NAMES[i as usize], map.get(&i, 0)?.iter().sum())))
        .collect()
}

fn endpoint(addr_be: u32, port_be: u16) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(u32::from_be(addr_be)),
        u16::from_be(port_be)
    )
}
