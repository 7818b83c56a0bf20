//! Later fragments of service flows follow the translation their first
//! fragment got (see `lb_common::frag`).

use aya_ebpf::programs::TcContext;
use lb_common::{
    ct::{CtValue, CT_SNAT},
    frag::{FragKey, FragValue, FRAG_AT_EGRESS, FRAG_AT_INGRESS, FRAG_LIFETIME_NS, FRAG_ROUTED},
    ipv4,
    stats::Stat,
    wire,
};

use crate::{ct, maps::FRAGS, nat, parse::Fragment, redirect, Outcome};

#[inline(always)]
fn key<const EGRESS: bool>(saddr_be: u32, daddr_be: u32, id_be: u16, proto: u8) -> FragKey {
    FragKey {
        saddr: ipv4(saddr_be),
        daddr: ipv4(daddr_be),
        id: u16::from_be(id_be),
        proto,
        hook: if EGRESS {
            FRAG_AT_EGRESS
        } else {
            FRAG_AT_INGRESS
        },
    }
}

/// Records the translation `to` a first fragment is about to get, for the
/// later fragments of its datagram.
#[inline(always)]
pub fn record<const EGRESS: bool>(
    saddr_be: u32,
    daddr_be: u32,
    id_be: u16,
    proto: u8,
    to: &CtValue,
) -> Result<(), ()> {
    let value = FragValue {
        src_addr: to.src_addr,
        dst_addr: to.dst_addr,
        flags: if to.flags & CT_SNAT != 0 {
            FRAG_ROUTED
        } else {
            0
        },
        _pad: [0; 7],
        expires_ns: ct::now() + FRAG_LIFETIME_NS,
    };
    FRAGS
        .insert(&key::<EGRESS>(saddr_be, daddr_be, id_be, proto), &value, 0)
        .map_err(|_| ())
}

/// A later fragment: rewritten as its datagram's first fragment was at
/// this hook, and routed like it when its flow is SNATed; untouched when no
/// first fragment was recorded (not a service flow's, or out of order).
#[inline(always)]
pub fn follow<const EGRESS: bool>(ctx: &TcContext, frag: &Fragment) -> Outcome {
    let key = key::<EGRESS>(frag.saddr_be, frag.daddr_be, frag.id_be, frag.proto);
    // SAFETY: a map value pointer, copied at once.
    let Some(record) = FRAGS.get_ptr(&key).map(|v| unsafe { *v }) else {
        return Outcome::next(Stat::PassFragmentUntracked);
    };
    if ct::now() >= record.expires_ns {
        return Outcome::next(Stat::PassFragmentUntracked);
    }
    let old = (frag.saddr_be, frag.daddr_be);
    let new = (wire(record.src_addr), wire(record.dst_addr));
    if record.flags & FRAG_ROUTED == 0 {
        if nat::translate_addresses(ctx, old, new).is_err() {
            return Outcome::drop(Stat::DropRewrite);
        }
        return Outcome::next(Stat::FragTranslated);
    }
    let route = match redirect::lookup(
        ctx,
        frag.proto,
        &record.src_addr,
        &record.dst_addr,
        frag.tot_len,
    ) {
        Ok(route) if route.way != redirect::Way::TooBig => route,
        // A fragment is not fragmented again here.
        _ => return Outcome::drop(Stat::DropRedirect),
    };
    if nat::translate_addresses(ctx, old, new).is_err() {
        return Outcome::drop(Stat::DropRewrite);
    }
    match redirect::send::<lb_common::Ipv4>(ctx, frag.proto, &route) {
        Ok(action) => Outcome {
            action,
            stat: Stat::FragTranslated,
        },
        Err(()) => Outcome::drop(Stat::DropRedirect),
    }
}
