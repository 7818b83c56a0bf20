//! A new flow to a frontend with no backends is answered, like kube-proxy's
//! REJECT rule, with ICMP port unreachable from the VIP: TCP clients get
//! ECONNREFUSED at once, connected UDP sockets get ECONNREFUSED on their next
//! call. A routed packet too big for the way out is answered with
//! "fragmentation needed". The packet is rebuilt in place and sent back out
//! the interface it came in on.
//!
//! Only packets without IP options are answered (fixed 28-byte quote);
//! others are dropped and counted (`drop_reject`). Answers are
//! rate-limited per CPU (`lb_common::icmp`); a packet past the limit is
//! dropped unanswered (`drop_icmp_rate_limited`).

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{icmp::IcmpLimit, stats::Stat, IPPROTO_ICMP};

use crate::{
    csum,
    maps::ICMP_BUCKET,
    parse::{Packet, ETH_HLEN},
    Outcome,
};

/// Set by the agent at load time (`--icmp-errors-per-second`, `--icmp-errors-burst`).
#[unsafe(no_mangle)]
static ICMP_LIMIT: IcmpLimit = IcmpLimit::DEFAULT;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// Original IP header (no options) plus the first 8 bytes of its payload.
const QUOTE_LEN: u32 = 28;
const REPLY_IP_LEN: u32 = 20 + 8 + QUOTE_LEN;

#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> Outcome {
    answer(ctx, pkt, ICMP_PORT_UNREACH, 0, Stat::RejectNoBackend)
}

/// A routed (SNATed) packet too big for the way out, DF set: answered with
/// "fragmentation needed" and the next hop's MTU, from the address it was
/// sent to, so the sender's path-MTU discovery works through the node.
#[inline(always)]
pub fn frag_needed(ctx: &TcContext, pkt: &Packet, mtu: u16) -> Outcome {
    answer(ctx, pkt, ICMP_FRAG_NEEDED, mtu, Stat::IcmpFragNeeded)
}

/// Turns the packet into an ICMP destination-unreachable error (`code`,
/// `mtu` for "fragmentation needed") and sends it back out.
#[inline(always)]
fn answer(ctx: &TcContext, pkt: &Packet, code: u8, mtu: u16, stat: Stat) -> Outcome {
    if !allowed() {
        return Outcome::drop(Stat::DropIcmpRateLimited);
    }
    match build(ctx, pkt, code, mtu) {
        Ok(()) => {
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            Outcome {
                action: unsafe { bpf_redirect(ifindex, 0) } as i32,
                stat,
            }
        }
        Err(()) => Outcome::drop(Stat::DropReject),
    }
}

/// Whether this CPU's bucket has a token for one more answer (taken).
#[inline(always)]
fn allowed() -> bool {
    // SAFETY: a read-only global; volatile so the agent's value is used,
    // not the compile-time default.
    let limit = unsafe { core::ptr::read_volatile(&ICMP_LIMIT) };
    let Some(bucket) = ICMP_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: this CPU's entry, valid for the program run; a program runs
    // on one CPU without preemption by another run of the same CPU's entry.
    unsafe { (*bucket).take(now, &limit) }
}

#[inline(always)]
fn build(ctx: &TcContext, pkt: &Packet, code: u8, mtu: u16) -> Result<(), ()> {
    if pkt.ihl_len != 20 {
        return Err(());
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut quote: [u32; 7] = ctx.load(ETH_HLEN as usize).map_err(|_| ())?;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, ETH_HLEN + REPLY_IP_LEN, 0) } != 0 {
        return Err(());
    }

    let mut eth = [0u8; 14];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12] = 0x08; // ETH_P_IP

    let mut ip = Aligned([0u8; 20]);
    ip.0[0] = 0x45;
    ip.0[1] = 0xc0; // precedence "internetwork control", as the kernel's ICMP
    ip.0[2..4].copy_from_slice(&(REPLY_IP_LEN as u16).to_be_bytes());
    ip.0[8] = 64;
    ip.0[9] = IPPROTO_ICMP;
    ip.0[12..16].copy_from_slice(&pkt.daddr_be.to_ne_bytes()); // from the VIP
    ip.0[16..20].copy_from_slice(&pkt.saddr_be.to_ne_bytes()); // to the client
    let ip_csum = csum::fold(csum::partial(ip.as_words(), 20, 0));
    ip.0[10..12].copy_from_slice(&ip_csum.to_ne_bytes());

    let [mtu_hi, mtu_lo] = mtu.to_be_bytes();
    let mut icmp = Aligned([ICMP_DEST_UNREACH, code, 0, 0, 0, 0, mtu_hi, mtu_lo]);
    let sum = csum::partial(icmp.as_words(), 8, 0);
    let icmp_csum = csum::fold(csum::partial(quote.as_mut_ptr(), QUOTE_LEN, sum));
    icmp.0[2..4].copy_from_slice(&icmp_csum.to_ne_bytes());

    ctx.store(0, &eth, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN as usize, &ip.0, 0).map_err(|_| ())?;
    ctx.store((ETH_HLEN + 20) as usize, &icmp.0, 0)
        .map_err(|_| ())?;
    ctx.store((ETH_HLEN + 28) as usize, &quote, 0)
        .map_err(|_| ())
}

/// A byte buffer `bpf_csum_diff` can read as 32-bit words.
#[repr(C, align(4))]
struct Aligned<const N: usize>([u8; N]);

impl<const N: usize> Aligned<N> {
    #[inline(always)]
    fn as_words(&mut self) -> *mut u32 {
        self.0.as_mut_ptr().cast()
    }
}
