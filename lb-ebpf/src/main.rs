//! tc (clsact ingress) service load balancer: DNAT to a backend, conntrack,
//! reverse NAT of replies. See README.md "Packet path".
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
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    ct::{CtKey, CT_DIR_FORWARD, CT_DIR_REPLY},
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
    const fn pass(stat: Stat) -> Self {
        Self {
            action: TC_ACT_OK as i32,
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
    let outcome = process(&ctx);
    count(outcome.stat);
    outcome.action
}

fn process(ctx: &TcContext) -> Outcome {
    let pkt = match parse::parse(ctx) {
        Parsed::Packet(pkt) => pkt,
        Parsed::NotForUs => return Outcome::pass(Stat::PassNotService),
        Parsed::Malformed => return Outcome::pass(Stat::PassMalformed),
    };
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };

    // Frontend first: a client's packet costs one lookup before its
    // conntrack entry; anything else is a reply candidate or not ours.
    let frontend = SvcKey::new(pkt.daddr_be, pkt.dport_be, pkt.proto, 0);
    let Some(svc) = maps::SERVICES.get_ptr(&frontend) else {
        return reverse_nat(ctx, &pkt, now);
    };
    if pkt.is_fragment {
        // Later fragments carry no ports and never get here; the first one
        // would be NATed alone. Without reassembly, drop it and count.
        return Outcome::drop(Stat::DropFragment);
    }

    let forward_key = pkt.ct_key(CT_DIR_FORWARD);
    if let Some(entry) =
        ct::lookup_live(&forward_key, pkt.proto, now).filter(|e| !ct::is_reopened(*e, &pkt))
    {
        ct::touch(entry, &pkt, now);
        return dnat(
            ctx,
            &pkt,
            unsafe { (*entry).nat_addr_be },
            unsafe { (*entry).nat_port_be },
            Stat::DnatCtHit,
        );
    }

    // New flow: pick a slot by flow hash, so a lost conntrack entry still
    // maps a flow to the same backend while the backend set is unchanged.
    let (count_, rev_nat_id) = unsafe { ((*svc).count, (*svc).rev_nat_id) };
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
    if ct::create(&pkt, baddr, bport, backend_id, rev_nat_id, now).is_err() {
        return Outcome::drop(Stat::DropCtInsert);
    }
    dnat(ctx, &pkt, baddr, bport, Stat::DnatNew)
}

/// A backend's reply matches a reply-direction entry and leaves with the
/// frontend as its source; anything else passes untouched.
#[inline(always)]
fn reverse_nat(ctx: &TcContext, pkt: &Packet, now: u64) -> Outcome {
    let reply_key = pkt.ct_key(CT_DIR_REPLY);
    let Some(entry) = ct::lookup_live(&reply_key, pkt.proto, now) else {
        return Outcome::pass(Stat::PassNotService);
    };
    if pkt.is_tcp_syn_ack() && !ct::forward_is_open(entry, pkt) {
        // A handshake answer on a tuple whose service flow has closed belongs
        // to another connection: the client reused the port to reach the
        // backend directly. Drop the stale entry; leave the packet alone.
        ct::forget(&reply_key);
        return Outcome::pass(Stat::PassNotService);
    }
    if pkt.is_fragment {
        return Outcome::drop(Stat::DropFragment);
    }
    ct::touch(entry, pkt, now);
    match nat::rewrite_source(ctx, pkt, unsafe { (*entry).nat_addr_be }, unsafe {
        (*entry).nat_port_be
    }) {
        Ok(()) => Outcome::pass(Stat::RevNat),
        Err(()) => Outcome::drop(Stat::DropRewrite),
    }
}

#[inline(always)]
fn dnat(ctx: &TcContext, pkt: &Packet, addr_be: u32, port_be: u16, stat: Stat) -> Outcome {
    match nat::rewrite_destination(ctx, pkt, addr_be, port_be) {
        Ok(()) => Outcome::pass(stat),
        Err(()) => Outcome::drop(Stat::DropRewrite),
    }
}

impl Packet {
    #[inline(always)]
    fn ct_key(&self, dir: u8) -> CtKey {
        CtKey {
            saddr_be: self.saddr_be,
            daddr_be: self.daddr_be,
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            dir,
            _pad: [0; 2],
        }
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
