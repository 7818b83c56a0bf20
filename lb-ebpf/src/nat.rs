//! Address and port rewrites with incremental checksum updates.
//!
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` also handles CHECKSUM_PARTIAL
//! skbs (locally generated, offloaded), and `BPF_F_MARK_MANGLED_0` keeps a
//! zero UDP checksum ("none") at zero and turns a computed zero into 0xffff.
//! The IPv4 checksum is updated here and written with the addresses, and
//! both ports with one store: each helper call is a call into the skb code.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{ct::CtValue, wire, IPPROTO_UDP};

use crate::{
    csum::Sum,
    parse::{read, Packet, IP_CSUM_OFF},
};

/// Rewrites the packet to the tuple its conntrack entry gives it: the
/// destination (DNAT: client → backend), the source (reverse NAT: backend →
/// VIP), or both (SNAT flows). Unchanged fields are not touched.
#[inline(always)]
pub fn translate(ctx: &TcContext, pkt: &Packet, to: &CtValue) -> Result<(), ()> {
    // In wire order, as the packet holds them.
    let (saddr, daddr) = (wire(to.src_addr), wire(to.dst_addr));
    let (sport, dport) = (to.src_port.to_be(), to.dst_port.to_be());
    let mangled = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = pkt.l4_csum_off() as usize;
    let l4 = |old: u64, new: u64, flags: u64| {
        ctx.l4_csum_replace(csum_off, old, new, flags | mangled)
            .map_err(|_| ())
    };
    if saddr != pkt.saddr_be || daddr != pkt.daddr_be {
        // The addresses are in the transport's pseudo-header.
        let mut ip_sum = Sum::start(read::<u16>(ctx, IP_CSUM_OFF)?);
        for (old, new) in [(pkt.saddr_be, saddr), (pkt.daddr_be, daddr)] {
            if old != new {
                l4(u64::from(old), u64::from(new), BPF_F_PSEUDO_HDR as u64 | 4)?;
                ip_sum.replace32(old, new);
            }
        }
        store_addresses(ctx, ip_sum.finish(), saddr, daddr)?;
    }
    if sport != pkt.sport_be || dport != pkt.dport_be {
        for (old, new) in [(pkt.sport_be, sport), (pkt.dport_be, dport)] {
            if old != new {
                l4(u64::from(old), u64::from(new), 2)?;
            }
        }
        // Source and destination port, adjacent: one store.
        let mut ports = [0u8; 4];
        ports[..2].copy_from_slice(&sport.to_ne_bytes());
        ports[2..].copy_from_slice(&dport.to_ne_bytes());
        ctx.store(pkt.l4_off as usize, &ports, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// Rewrites a later fragment's addresses (all in wire order): the IP
/// header only, as it carries no transport header.
#[inline(always)]
pub fn translate_addresses(
    ctx: &TcContext,
    (saddr, daddr): (u32, u32),
    (new_saddr, new_daddr): (u32, u32),
) -> Result<(), ()> {
    let mut ip_sum = Sum::start(read::<u16>(ctx, IP_CSUM_OFF)?);
    ip_sum.replace32(saddr, new_saddr);
    ip_sum.replace32(daddr, new_daddr);
    store_addresses(ctx, ip_sum.finish(), new_saddr, new_daddr)
}

/// Header bytes 10..20, one store: checksum, source, destination.
#[inline(always)]
fn store_addresses(ctx: &TcContext, ip_csum: u16, saddr: u32, daddr: u32) -> Result<(), ()> {
    let mut header = [0u8; 10];
    header[..2].copy_from_slice(&ip_csum.to_ne_bytes());
    header[2..6].copy_from_slice(&saddr.to_ne_bytes());
    header[6..].copy_from_slice(&daddr.to_ne_bytes());
    ctx.store(IP_CSUM_OFF as usize, &header, 0).map_err(|_| ())
}
