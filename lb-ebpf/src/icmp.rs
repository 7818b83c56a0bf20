//! ICMP errors about translated flows (fragmentation needed, port or host
//! unreachable, time exceeded, parameter problem). An error quotes the
//! packet that caused it as that packet was on the wire where it failed:
//! after our translation. The endpoint it is sent to knows the flow by the
//! other side of the translation, so the quoted tuple, its checksums and the
//! outer addresses are translated back, or the endpoint drops the error (and
//! path-MTU discovery through a service breaks).
//!
//! The rule, for every direction: the quoted packet P, reversed, is a tuple
//! the conntrack entry E translated to (E.src → E.dst). The receiver knows P
//! as that translation reversed: the quote becomes (E.dst → E.src), the
//! error goes to E.dst, and an error raised by P's destination itself comes
//! from E.src. ICMPv6 errors (destination unreachable, packet too big,
//! time exceeded, parameter problem) follow the same rule; their checksum
//! also covers the outer addresses (the pseudo-header), and there is no
//! IP header checksum.

use aya_ebpf::{helpers::bpf_csum_diff, programs::TcContext};
use lb_common::{
    ct::{CtKey, CtValue},
    Ipv4, Ipv6, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    csum::Sum,
    family::Family,
    parse::{IP6_SADDR_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
};

/// An error quoting a packet of a flow of family `A`: the flow's key, and
/// the rewrite for its receiver (see the module's rule).
pub trait QuotingError<A> {
    /// The conntrack key of the quoted packet reversed, in direction `dir`:
    /// the tuple an entry translated, if the flow is ours.
    fn quoted_reversed(&self, dir: u8) -> CtKey<A>;
    fn translate(&self, ctx: &TcContext, entry: &CtValue<A>) -> Result<(), ()>;
}

impl QuotingError<Ipv4> for IcmpError {
    #[inline(always)]
    fn quoted_reversed(&self, dir: u8) -> CtKey {
        IcmpError::quoted_reversed(self, dir)
    }
    #[inline(always)]
    fn translate(&self, ctx: &TcContext, entry: &CtValue) -> Result<(), ()> {
        translate(ctx, self, entry)
    }
}

/// An ICMP error quoting a TCP or UDP packet, with the offsets to rewrite.
pub struct IcmpError {
    pub outer_saddr_be: u32,
    pub outer_daddr_be: u32,
    /// The ICMP header (its checksum at +2).
    pub icmp_off: u32,
    /// The quoted IPv4 header and its transport header.
    pub inner_ip_off: u32,
    pub inner_l4_off: u32,
    pub inner_saddr_be: u32,
    pub inner_daddr_be: u32,
    pub inner_sport_be: u16,
    pub inner_dport_be: u16,
    pub inner_proto: u8,
    /// The quoted transport checksum, when the quote reaches it.
    pub inner_l4_csum_off: Option<u32>,
}

impl IcmpError {
    /// The conntrack key of the quoted packet reversed, in direction `dir`:
    /// the tuple an entry translated, if the flow is ours.
    #[inline(always)]
    pub fn quoted_reversed(&self, dir: u8) -> CtKey {
        CtKey::new(
            lb_common::ipv4(self.inner_daddr_be),
            u16::from_be(self.inner_dport_be),
            lb_common::ipv4(self.inner_saddr_be),
            u16::from_be(self.inner_sport_be),
            self.inner_proto,
            dir,
        )
    }
}

/// Rewrites the error for its receiver as `entry` translates the flow.
#[inline(always)]
pub fn translate(ctx: &TcContext, err: &IcmpError, entry: &CtValue) -> Result<(), ()> {
    // In wire order, as the packet holds them.
    let new_src = lb_common::wire(entry.dst_addr);
    let new_sport = entry.dst_port.to_be();
    let new_dst = lb_common::wire(entry.src_addr);
    let new_dport = entry.src_port.to_be();

    // Quoted IPv4 header checksum.
    let ip_csum_off = err.inner_ip_off + 10;
    let old_ip_csum: u16 = ctx.load(ip_csum_off as usize).map_err(|_| ())?;
    let mut ip_sum = Sum::start(old_ip_csum);
    ip_sum.replace32(err.inner_saddr_be, new_src);
    ip_sum.replace32(err.inner_daddr_be, new_dst);
    let new_ip_csum = ip_sum.finish();

    // Quoted transport checksum (pseudo-header addresses and ports), if
    // quoted; a UDP checksum of 0 means none and stays 0.
    let l4_csum = match err.inner_l4_csum_off {
        Some(off) => {
            let old: u16 = ctx.load(off as usize).map_err(|_| ())?;
            if err.inner_proto == IPPROTO_UDP && old == 0 {
                None
            } else {
                let mut sum = Sum::start(old);
                sum.replace32(err.inner_saddr_be, new_src);
                sum.replace32(err.inner_daddr_be, new_dst);
                sum.replace16(err.inner_sport_be, new_sport);
                sum.replace16(err.inner_dport_be, new_dport);
                let mut new = sum.finish();
                if err.inner_proto == IPPROTO_UDP && new == 0 {
                    new = 0xffff;
                }
                Some((off, old, new))
            }
        }
        None => None,
    };

    // The ICMP checksum covers every quoted byte that changed.
    let icmp_csum_off = err.icmp_off + 2;
    let old_icmp_csum: u16 = ctx.load(icmp_csum_off as usize).map_err(|_| ())?;
    let mut icmp_sum = Sum::start(old_icmp_csum);
    icmp_sum.replace32(err.inner_saddr_be, new_src);
    icmp_sum.replace32(err.inner_daddr_be, new_dst);
    icmp_sum.replace16(old_ip_csum, new_ip_csum);
    icmp_sum.replace16(err.inner_sport_be, new_sport);
    icmp_sum.replace16(err.inner_dport_be, new_dport);
    if let Some((_, old, new)) = l4_csum {
        icmp_sum.replace16(old, new);
    }
    let new_icmp_csum = icmp_sum.finish();

    let store32 = |off: u32, v: u32| ctx.store(off as usize, &v, 0).map_err(|_| ());
    let store16 = |off: u32, v: u16| ctx.store(off as usize, &v, 0).map_err(|_| ());
    store32(err.inner_ip_off + 12, new_src)?;
    store32(err.inner_ip_off + 16, new_dst)?;
    store16(ip_csum_off, new_ip_csum)?;
    store16(err.inner_l4_off, new_sport)?;
    store16(err.inner_l4_off + 2, new_dport)?;
    if let Some((off, _, new)) = l4_csum {
        store16(off, new)?;
    }
    store16(icmp_csum_off, new_icmp_csum)?;

    // The outer header: to E.dst; from E.src when P's destination raised it.
    let outer_src = if err.outer_saddr_be == err.inner_daddr_be {
        new_dst
    } else {
        err.outer_saddr_be
    };
    for (off, old, new) in [
        (IP_DADDR_OFF, err.outer_daddr_be, new_src),
        (IP_SADDR_OFF, err.outer_saddr_be, outer_src),
    ] {
        if old != new {
            ctx.l3_csum_replace(IP_CSUM_OFF as usize, old as u64, new as u64, 4)
                .map_err(|_| ())?;
            store32(off, new)?;
        }
    }
    Ok(())
}

/// Where the quoted transport header's checksum sits.
#[inline(always)]
pub const fn l4_csum_at(proto: u8) -> u32 {
    if proto == IPPROTO_TCP {
        16
    } else {
        6
    }
}

/// An ICMPv6 error quoting a TCP or UDP packet (its IPv6 header, no
/// extension headers, and at least the ports).
pub struct Icmp6Error {
    pub outer_saddr: Ipv6,
    /// The ICMPv6 header (its checksum at +2).
    pub icmp_off: u32,
    /// The quoted IPv6 header; its transport header follows it.
    pub inner_ip_off: u32,
    pub inner_saddr: Ipv6,
    pub inner_daddr: Ipv6,
    pub inner_sport_be: u16,
    pub inner_dport_be: u16,
    pub inner_proto: u8,
    /// The quoted transport checksum, when the quote reaches it.
    pub inner_l4_csum_off: Option<u32>,
}

/// `16` bytes of linear packet data at `off`, as `bpf_csum_diff` reads
/// them.
#[inline(always)]
fn packet_address(ctx: &TcContext, off: u32) -> Result<*mut u32, ()> {
    let start = ctx.data() + off as usize;
    if start + 16 > ctx.data_end() {
        return Err(());
    }
    Ok(start as *mut u32)
}

/// The one's-complement change from the address at `from` (packet) to
/// `to`, added to `seed`. Pointers, not copies: a copied 16-byte array
/// becomes a 128-bit integer the BPF backend spills by the dozen.
#[inline(always)]
fn address_diff(from: *mut u32, to: &Ipv6, seed: u32) -> Result<u32, ()> {
    // SAFETY: 16 readable bytes each (`packet_address`, an entry's field);
    // the helper only reads them.
    let diff = unsafe { bpf_csum_diff(from, 16, to.as_ptr() as *mut u32, 16, seed) };
    u32::try_from(diff).map_err(|_| ())
}

impl QuotingError<Ipv6> for Icmp6Error {
    #[inline(always)]
    fn quoted_reversed(&self, dir: u8) -> CtKey<Ipv6> {
        CtKey::new(
            self.inner_daddr,
            u16::from_be(self.inner_dport_be),
            self.inner_saddr,
            u16::from_be(self.inner_sport_be),
            self.inner_proto,
            dir,
        )
    }

    #[inline(always)]
    fn translate(&self, ctx: &TcContext, entry: &CtValue<Ipv6>) -> Result<(), ()> {
        let (new_src, new_sport) = (&entry.dst_addr, entry.dst_port.to_be());
        let (new_dst, new_dport) = (&entry.src_addr, entry.src_port.to_be());
        // Raised by P's destination itself: it comes from E.src.
        let raised_by_destination = self.outer_saddr.same(&self.inner_daddr);
        let inner_saddr_off = self.inner_ip_off + 8;
        let inner_l4_off = self.inner_ip_off + crate::parse::IP6_HLEN;

        // Every change but the checksums', as sums, before any store
        // moves the packet's pointers.
        let quoted = address_diff(packet_address(ctx, inner_saddr_off)?, new_src, 0)?;
        let quoted = address_diff(packet_address(ctx, inner_saddr_off + 16)?, new_dst, quoted)?;
        let outer = address_diff(packet_address(ctx, IP6_SADDR_OFF + 16)?, new_src, 0)?;
        let outer = if raised_by_destination {
            address_diff(packet_address(ctx, IP6_SADDR_OFF)?, new_dst, outer)?
        } else {
            outer
        };

        let l4_csum = match self.inner_l4_csum_off {
            Some(off) => {
                let old: u16 = ctx.load(off as usize).map_err(|_| ())?;
                if self.inner_proto == IPPROTO_UDP && old == 0 {
                    None // no checksum: stays none
                } else {
                    let mut sum = Sum::start(old);
                    sum.add(quoted);
                    sum.replace16(self.inner_sport_be, new_sport);
                    sum.replace16(self.inner_dport_be, new_dport);
                    let mut new = sum.finish();
                    if self.inner_proto == IPPROTO_UDP && new == 0 {
                        new = 0xffff;
                    }
                    Some((off, old, new))
                }
            }
            None => None,
        };

        // The ICMPv6 checksum: every quoted byte that changed, and the
        // pseudo-header's addresses.
        let icmp_csum_off = self.icmp_off + 2;
        let old_icmp_csum: u16 = ctx.load(icmp_csum_off as usize).map_err(|_| ())?;
        let mut icmp_sum = Sum::start(old_icmp_csum);
        icmp_sum.add(quoted);
        icmp_sum.add(outer);
        icmp_sum.replace16(self.inner_sport_be, new_sport);
        icmp_sum.replace16(self.inner_dport_be, new_dport);
        if let Some((_, old, new)) = l4_csum {
            icmp_sum.replace16(old, new);
        }
        let new_icmp_csum = icmp_sum.finish();

        let store = |off: u32, bytes: &Ipv6| ctx.store(off as usize, bytes, 0).map_err(|_| ());
        let store16 = |off: u32, v: u16| ctx.store(off as usize, &v, 0).map_err(|_| ());
        store(inner_saddr_off, new_src)?;
        store(inner_saddr_off + 16, new_dst)?;
        store16(inner_l4_off, new_sport)?;
        store16(inner_l4_off + 2, new_dport)?;
        if let Some((off, _, new)) = l4_csum {
            store16(off, new)?;
        }
        store16(icmp_csum_off, new_icmp_csum)?;
        store(IP6_SADDR_OFF + 16, new_src)?;
        if raised_by_destination {
            store(IP6_SADDR_OFF, new_dst)?;
        }
        Ok(())
    }
}
