//! Address and port rewrites with incremental checksum updates.
//!
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` also handles CHECKSUM_PARTIAL
//! skbs (locally generated, offloaded), and `BPF_F_MARK_MANGLED_0` keeps a
//! zero UDP checksum ("none") at zero and turns a computed zero into 0xffff.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{ct::CtValue, wire, IPPROTO_UDP};

use crate::parse::{Packet, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF};

/// Rewrites the packet to the tuple its conntrack entry gives it: the
/// destination (DNAT: client → backend), the source (reverse NAT: backend →
/// VIP), or both (SNAT flows). Unchanged halves are not touched.
#[inline(always)]
pub fn translate(ctx: &TcContext, pkt: &Packet, to: &CtValue) -> Result<(), ()> {
    // In wire order, as the packet holds them.
    let (dst_addr, dst_port) = (wire(to.dst_addr), to.dst_port.to_be());
    let (src_addr, src_port) = (wire(to.src_addr), to.src_port.to_be());
    if dst_addr != pkt.daddr_be || dst_port != pkt.dport_be {
        rewrite(
            ctx,
            pkt,
            IP_DADDR_OFF,
            pkt.daddr_be,
            dst_addr,
            pkt.l4_off + 2,
            pkt.dport_be,
            dst_port,
        )?;
    }
    if src_addr != pkt.saddr_be || src_port != pkt.sport_be {
        rewrite(
            ctx,
            pkt,
            IP_SADDR_OFF,
            pkt.saddr_be,
            src_addr,
            pkt.l4_off,
            pkt.sport_be,
            src_port,
        )?;
    }
    Ok(())
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    addr_off: u32,
    old_addr: u32,
    new_addr: u32,
    port_off: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let mangled = if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let csum_off = pkt.l4_csum_off() as usize;
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CSUM_OFF as usize, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| ())?;
        ctx.store(addr_off as usize, &new_addr, 0).map_err(|_| ())?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
            .map_err(|_| ())?;
        ctx.store(port_off as usize, &new_port, 0).map_err(|_| ())?;
    }
    Ok(())
}
