//! Plain-text rendering of the service maps, shared by `lb-agent inspect` and
//! the golden tests, so operators and tests read one format.

use std::fmt::Write as _;

use lb_common::{
    maglev::MAGLEV_REMOTE,
    svc::{
        SvcValue, SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_EXTERNAL_LOCAL,
        SVC_FLAG_INTERNAL_LOCAL, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_MAGLEV, SVC_FLAG_MAGLEV_TABLE_1,
        SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
    },
};

use crate::datapath::maps::Snapshot;

/// One block per frontend: slot 0, then each slot with its backend.
pub fn services(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    for ((frontend, slot), value) in &snapshot.slots {
        if *slot != 0 {
            continue;
        }
        let revnat = match snapshot.revnat.get(&value.rev_nat_id) {
            Some(r) if r.frontend == *frontend => match &r.owner {
                Some(owner) => format!("revnat={} service={owner}", value.rev_nat_id),
                None => format!("revnat={} service=?", value.rev_nat_id),
            },
            Some(r) => format!("revnat={} (MISMATCH: {})", value.rev_nat_id, r.frontend),
            None => format!("revnat={} (MISSING)", value.rev_nat_id),
        };
        let _ = writeln!(
            out,
            "{frontend} count={} local={} {revnat} {}{}",
            value.count,
            value.local_count,
            kind(value.flags),
            policies(value)
        );
        if value.count == 0 {
            let _ = writeln!(out, "  (no backends: new flows are rejected)");
        }
        for s in 1..=value.count {
            let line = match snapshot.slots.get(&(*frontend, s)) {
                None => "MISSING".to_string(),
                Some(v) => match snapshot.backends.get(&v.backend_id) {
                    Some(b) => format!("backend {} {b}", v.backend_id),
                    None => format!("backend {} MISSING", v.backend_id),
                },
            };
            let _ = writeln!(out, "  slot {s}: {line}");
        }
        let matches: Vec<String> = snapshot
            .affinity_match
            .range((value.rev_nat_id, 0)..=(value.rev_nat_id, u32::MAX))
            .map(|((_, id), local)| format!("{id}{}", if *local { " (local)" } else { "" }))
            .collect();
        let ranges: Vec<String> = snapshot
            .source_ranges
            .range((value.rev_nat_id, ipnet::IpNet::default())..)
            .take_while(|(id, _)| *id == value.rev_nat_id)
            .map(|(_, range)| range.to_string())
            .collect();
        if value.flags & SVC_FLAG_SOURCE_RANGES != 0 && ranges.is_empty() {
            let _ = writeln!(
                out,
                "  clients admitted from: none (no range of this family)"
            );
        } else if value.flags & SVC_FLAG_SOURCE_RANGES != 0 {
            let _ = writeln!(out, "  clients admitted from: [{}]", ranges.join(", "));
        }
        if value.flags & SVC_FLAG_MAGLEV != 0 {
            let _ = writeln!(out, "  {}", maglev_line(snapshot, value));
        }
        if !matches.is_empty() {
            let _ = writeln!(
                out,
                "  affinity may return to backends: {}",
                matches.join(", ")
            );
        }
    }
    out
}

/// The current Maglev table: which one, its size, each backend's share.
fn maglev_line(snapshot: &Snapshot, value: &SvcValue) -> String {
    let table = u16::from(value.flags & SVC_FLAG_MAGLEV_TABLE_1 != 0);
    let size = value.maglev_table_size as usize;
    let Some(entries) = snapshot
        .maglev
        .get(&(value.rev_nat_id, table))
        .filter(|e| e.len() >= size)
    else {
        return format!("maglev table {table}: MISSING ({size} entries)");
    };
    let mut shares = std::collections::BTreeMap::<u32, usize>::new();
    for entry in &entries[..size] {
        *shares.entry(entry & !MAGLEV_REMOTE).or_default() += 1;
    }
    let shares: Vec<String> = shares.iter().map(|(id, n)| format!("{id}×{n}")).collect();
    format!(
        "maglev table {table}: {size} entries, backends {}",
        shares.join(" ")
    )
}

fn kind(flags: u16) -> &'static str {
    if flags & SVC_FLAG_NODE_PORT != 0 {
        "NodePort"
    } else if flags & SVC_FLAG_LOAD_BALANCER != 0 {
        "LoadBalancer"
    } else if flags & SVC_FLAG_EXTERNAL_IP != 0 {
        "externalIP"
    } else {
        "ClusterIP"
    }
}

/// The policies that differ from the defaults.
fn policies(value: &SvcValue) -> String {
    let mut out = String::new();
    if value.flags & SVC_FLAG_EXTERNAL_LOCAL != 0 {
        out.push_str(" externalTrafficPolicy=Local");
    }
    if value.flags & SVC_FLAG_INTERNAL_LOCAL != 0 {
        out.push_str(" internalTrafficPolicy=Local");
    }
    if value.flags & SVC_FLAG_AFFINITY != 0 {
        let _ = write!(out, " affinity=ClientIP/{}s", value.affinity_timeout_s);
    }
    if value.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        out.push_str(" sourceRanges");
    }
    out
}
