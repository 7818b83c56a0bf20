//! tc service load balancer. Ingress (`lb_ingress`): DNAT a client's packet
//! to a backend and track the flow. Egress (`lb_egress`): reverse-NAT the
//! backend's reply on its way out to the client. Between the two hooks the
//! node's own stack (routing, netfilter) sees the flow as client ↔ backend
//! in both directions, consistently. See README.md "Packet path".
#![no_std]
#![no_main]

mod csum;
mod ct;
mod maps;
mod nat;
mod parse;
mod reject;
mod stats;

use aya_ebpf::{
    bindings::{tcx_action_base::TCX_NEXT, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    ct::{CT_DIR_FORWARD, CT_DIR_REPLY},
    hash::{flow_hash, select_slot},
    stats::Stat,
    svc::SvcKey,
};

use crate::{
    parse::{Packet, Parsed},
    stats::count,
};

/// Verdict plus the counter that explains it.
pub struct Outcome {
    pub action: i32,
    pub stat: Stat,
}

impl Outcome {
    /// Continue with the next program or tc filter on the hook (TCX_NEXT,
    /// i.e. TC_ACT_UNSPEC), then the stack. Used for packets we leave alone
    /// and for those we translated: a CNI's or a shaper's programs still see
    /// every packet, translated ones as client ↔ backend.
    const fn next(stat: Stat) -> Self {
        Self {
            action: TCX_NEXT,
            stat,
        }
    }
    const fn drop(stat: Stat) -> Self {
        Self {
            action: TC_ACT_SHOT as i32,
            stat,
        }
    }
}

#[classifier]
pub fn lb_ingress(ctx: TcContext) -> i32 {
    let outcome = ingress(&ctx);
    count(outcome.stat);
    outcome.action
}

#[classifier]
pub fn lb_egress(ctx: TcContext) -> i32 {
    let outcome = egress(&ctx);
    count(outcome.stat);
    outcome.action
}

fn ingress(ctx: &TcContext) -> Outcome {
    let pkt = match parse::parse(ctx) {
        Parsed::Packet(pkt) => pkt,
        Parsed::NotForUs => return Outcome::next(Stat::PassNotService),
        Parsed::Malformed => return Outcome::next(Stat::PassMalformed),
    };
    let frontend = SvcKey::new(pkt.daddr_be, pkt.dport_be, pkt.proto, 0);
    let Some(svc) = maps::SERVICES.get_ptr(&frontend) else {
        return Outcome::next(Stat::PassNotService);
    };
    // SAFETY: copied at once; the agent may rewrite slot 0 at any time.
    let (count_, rev_nat_id) = unsafe { ((*svc).count, (*svc).rev_nat_id) };
    if pkt.is_fragment {
        // Later fragments carry no ports and never get here; the first one
        // would be NATed alone. Without reassembly, drop it and count.
        return Outcome::drop(Stat::DropFragment);
    }
    let forward_key = pkt.ct_key(CT_DIR_FORWARD);
    let found = ct::lookup_flow(&forward_key);
    if let Some((entry, now)) = found.filter(|(e, _)| !ct::is_reopened(e, &pkt)) {
        ct::update(&forward_key, &entry, &pkt, now);
        return dnat(
            ctx,
            &pkt,
            entry.nat_addr_be,
            entry.nat_port_be,
            Stat::DnatCtHit,
        );
    }

    // New flow: pick a slot by flow hash, so a lost conntrack entry still
    // maps a flow to the same backend while the backend set is unchanged.
    if count_ == 0 {
        return reject::port_unreachable(ctx, &pkt);
    }
    let hash = flow_hash(
        pkt.saddr_be,
        pkt.daddr_be,
        pkt.sport_be,
        pkt.dport_be,
        pkt.proto,
    );
    let slot_key = SvcKey::new(
        pkt.daddr_be,
        pkt.dport_be,
        pkt.proto,
        select_slot(hash, count_),
    );
    let Some(slot) = maps::SERVICES.get_ptr(&slot_key) else {
        return Outcome::drop(Stat::DropBackendMissing);
    };
    let backend_id = unsafe { (*slot).backend_id };
    let Some(backend) = maps::BACKENDS.get_ptr(&backend_id) else {
        return Outcome::drop(Stat::DropBackendMissing);
    };
    let (baddr, bport) = unsafe { ((*backend).addr_be, (*backend).port_be) };
    let now = found.map_or_else(ct::now, |(_, now)| now);
    if ct::create(&pkt, baddr, bport, backend_id, rev_nat_id, now).is_err() {
        return Outcome::drop(Stat::DropCtFull);
    }
    dnat(ctx, &pkt, baddr, bport, Stat::DnatNew)
}

/// A backend's reply matches a reply-direction entry and leaves with the
/// frontend as its source; anything else passes untouched.
fn egress(ctx: &TcContext) -> Outcome {
    let pkt = match parse::parse(ctx) {
        Parsed::Packet(pkt) => pkt,
        Parsed::NotForUs => return Outcome::next(Stat::PassNotReply),
        Parsed::Malformed => return Outcome::next(Stat::PassMalformed),
    };
    let reply_key = pkt.ct_key(CT_DIR_REPLY);
    let Some((entry, now)) = ct::lookup_flow(&reply_key) else {
        return Outcome::next(Stat::PassNotReply);
    };
    if pkt.is_tcp_syn_ack() && !ct::forward_is_open(&reply_key, &entry, &pkt) {
        // A handshake answer on a tuple whose service flow has closed belongs
        // to another connection: the client reused the port to reach the
        // backend directly. Drop the stale entry; leave the packet alone.
        ct::forget(&reply_key);
        return Outcome::next(Stat::PassNotReply);
    }
    if pkt.is_fragment {
        return Outcome::drop(Stat::DropFragment);
    }
    ct::update(&reply_key, &entry, &pkt, now);
    match nat::rewrite_source(ctx, &pkt, entry.nat_addr_be, entry.nat_port_be) {
        Ok(()) => Outcome::next(Stat::RevNat),
        Err(()) => Outcome::drop(Stat::DropRewrite),
    }
}

#[inline(always)]
fn dnat(ctx: &TcContext, pkt: &Packet, addr_be: u32, port_be: u16, stat: Stat) -> Outcome {
    match nat::rewrite_destination(ctx, pkt, addr_be, port_be) {
        Ok(()) => Outcome::next(stat),
        Err(()) => Outcome::drop(Stat::DropRewrite),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
