//! Address and port rewrites with incremental checksum updates.
//!
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` also handles CHECKSUM_PARTIAL
//! skbs (locally generated, offloaded), and `BPF_F_MARK_MANGLED_0` keeps a
//! zero UDP checksum ("none") at zero and turns a computed zero into 0xffff.
//! The IPv4 checksum is updated here and written with the addresses, and
//! both ports with one store: each helper call is a call into the skb code.
//! IPv6 has no header checksum: its addresses' change to the transport
//! checksum is one `bpf_csum_diff`, applied with one replace.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_skb_store_bytes},
    programs::TcContext,
};
use lb_common::{ct::CtValue, wire, Ipv4, Ipv6, IPPROTO_UDP};

use crate::{
    csum::Sum,
    family::Family,
    parse::{read, Packet, IP6_SADDR_OFF, IP_CSUM_OFF},
};

/// A family's address rewrite to `to`'s: the IP header and the transport
/// checksum at `csum_off` (its pseudo-header holds the addresses).
pub trait Rewrite: Family {
    fn rewrite_addresses(
        ctx: &TcContext,
        csum_off: usize,
        csum_flags: u64,
        pkt: &Packet<Self>,
        to: &CtValue<Self>,
    ) -> Result<(), ()>;
}

impl Rewrite for Ipv4 {
    #[inline(always)]
    fn rewrite_addresses(
        ctx: &TcContext,
        csum_off: usize,
        csum_flags: u64,
        pkt: &Packet,
        to: &CtValue,
    ) -> Result<(), ()> {
        // In wire order, as the packet holds them.
        let (saddr, daddr) = (wire(to.src_addr), wire(to.dst_addr));
        let mut ip_sum = Sum::start(read::<u16>(ctx, IP_CSUM_OFF)?);
        for (old, new) in [(pkt.saddr_be(), saddr), (pkt.daddr_be(), daddr)] {
            if old != new {
                let flags = csum_flags | BPF_F_PSEUDO_HDR as u64 | 4;
                ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), flags)
                    .map_err(|_| ())?;
                ip_sum.replace32(old, new);
            }
        }
        store_addresses(ctx, ip_sum.finish(), saddr, daddr)
    }
}

impl Rewrite for Ipv6 {
    /// Source and destination are adjacent in the header as in the entry
    /// (`CtValue::ADDRESSES_LEN` bytes from its start): the checksum's
    /// change is one `bpf_csum_diff` from the packet's bytes to the
    /// entry's, applied with one replace, and one store writes both. No
    /// copies: byte-wise copies of 16-byte arrays become 128-bit integer
    /// operations the BPF backend cannot lower.
    #[inline(always)]
    fn rewrite_addresses(
        ctx: &TcContext,
        csum_off: usize,
        csum_flags: u64,
        _: &Packet<Ipv6>,
        to: &CtValue<Ipv6>,
    ) -> Result<(), ()> {
        const LEN: u32 = CtValue::<Ipv6>::ADDRESSES_LEN as u32;
        let start = ctx.data() + IP6_SADDR_OFF as usize;
        if start + LEN as usize > ctx.data_end() {
            return Err(());
        }
        let new = to as *const CtValue<Ipv6> as *mut u32;
        // SAFETY: `LEN` bytes of linear packet data (checked) and of the
        // entry, which starts with both addresses; the helper only reads.
        let diff = unsafe { bpf_csum_diff(start as *mut u32, LEN, new, LEN, 0) };
        if diff < 0 {
            return Err(());
        }
        // Size 0: `diff` is a sum to add, not a field's old and new value.
        ctx.l4_csum_replace(
            csum_off,
            0,
            diff as u64,
            csum_flags | BPF_F_PSEUDO_HDR as u64,
        )
        .map_err(|_| ())?;
        // SAFETY: as above; the helper copies `LEN` bytes from the entry.
        let stored = unsafe {
            bpf_skb_store_bytes(
                ctx.skb.skb as *mut _,
                IP6_SADDR_OFF,
                new as *const _,
                LEN,
                0,
            )
        };
        if stored < 0 {
            return Err(());
        }
        Ok(())
    }
}

/// Rewrites the packet to the tuple its conntrack entry gives it: the
/// destination (DNAT: client → backend), the source (reverse NAT: backend →
/// VIP), or both (SNAT flows). Unchanged fields are not touched.
#[inline(always)]
pub fn translate<A: Rewrite>(ctx: &TcContext, pkt: &Packet<A>, to: &CtValue<A>) -> Result<(), ()> {
    let (sport, dport) = (to.src_port.to_be(), to.dst_port.to_be());
    let mangled = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = pkt.l4_csum_off() as usize;
    if !to.src_addr.same(&pkt.saddr) || !to.dst_addr.same(&pkt.daddr) {
        A::rewrite_addresses(ctx, csum_off, mangled, pkt, to)?;
    }
    let l4 = |old: u64, new: u64, flags: u64| {
        ctx.l4_csum_replace(csum_off, old, new, flags | mangled)
            .map_err(|_| ())
    };
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
