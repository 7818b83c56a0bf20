//! Bounds-checked, IHL-aware header parsing with direct packet access (the
//! headers are pulled into the linear area first when they are not there
//! already); nothing is read past the IPv4 total length.

use aya_ebpf::programs::TcContext;
use lb_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

pub use crate::icmp::IcmpError;

pub const ETH_HLEN: u32 = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const IP_CSUM_OFF: u32 = ETH_HLEN + 10;
pub const IP_SADDR_OFF: u32 = ETH_HLEN + 12;
pub const IP_DADDR_OFF: u32 = ETH_HLEN + 16;
const IP_MF: u16 = 0x2000;
const IP_DF: u16 = 0x4000;
const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The fixed part of an IPv4 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Fixed {
    version_ihl: u8,
    tos: u8,
    tot_len_be: u16,
    id_be: u16,
    frag_off_be: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr_be: u32,
    daddr_be: u32,
}

/// A TCP or UDP over IPv4 packet whose headers are complete.
pub struct Packet {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// First fragment of a fragmented datagram (later ones are `Fragment`s).
    pub is_fragment: bool,
    /// The IP header's identification (names the datagram of a fragment).
    pub id_be: u16,
    /// IPv4 header length in bytes (20 without options).
    pub ihl_len: u32,
    pub l4_off: u32,
    /// IPv4 total length (a GSO packet's is its segments' together).
    pub tot_len: u16,
    /// DF set: a router must not fragment it.
    pub dont_fragment: bool,
}

/// A later fragment of a TCP or UDP datagram: no transport header.
pub struct Fragment {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub tot_len: u16,
}

pub enum Parsed {
    Packet(Packet),
    /// A non-first fragment (see `frag`).
    Fragment(Fragment),
    /// An ICMP error quoting a TCP or UDP packet (see `icmp`).
    IcmpError(IcmpError),
    /// Not IPv4 TCP/UDP: not ours to touch.
    NotForUs,
    /// Headers truncated or inconsistent: never rewritten.
    Malformed,
}

impl Packet {
    #[inline(always)]
    pub fn l4_csum_off(&self) -> u32 {
        if self.proto == IPPROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }

    /// A connection request (SYN without ACK).
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// Any SYN (a request, or an acceptance and its retransmits).
    #[inline(always)]
    pub fn carries_syn(&self) -> bool {
        self.tcp_flags & TCP_SYN != 0
    }

    /// A connection's acceptance (SYN with ACK).
    #[inline(always)]
    pub fn is_tcp_syn_ack(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
    }

    #[inline(always)]
    pub fn is_tcp_fin(&self) -> bool {
        self.tcp_flags & TCP_FIN != 0
    }

    #[inline(always)]
    pub fn is_tcp_rst(&self) -> bool {
        self.tcp_flags & TCP_RST != 0
    }
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    match try_parse(ctx) {
        Ok(parsed) => parsed,
        Err(()) => Parsed::Malformed,
    }
}

/// A pointer to a `T` at `off`, if the linear data holds all of it.
#[inline(always)]
fn at<T>(ctx: &TcContext, off: u32) -> Result<*const T, ()> {
    let start = ctx.data() + off as usize;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(());
    }
    Ok(start as *const T)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: u32) -> Result<T, ()> {
    // SAFETY: `at` checked the bounds; packet data has no alignment guarantee.
    Ok(unsafe { core::ptr::read_unaligned(at::<T>(ctx, off)?) })
}

/// Makes the first `len` bytes linear if they are not already. Pulling more
/// than the headers would copy payload out of the fragments on every packet.
#[inline(always)]
fn ensure_linear(ctx: &TcContext, len: u32) -> Result<(), ()> {
    if ctx.data() + len as usize <= ctx.data_end() {
        return Ok(());
    }
    if len > ctx.len() {
        return Err(());
    }
    ctx.pull_data(len).map_err(|_| ())
}

#[inline(always)]
fn try_parse(ctx: &TcContext) -> Result<Parsed, ()> {
    if ensure_linear(ctx, ETH_HLEN).is_err() {
        return Ok(Parsed::NotForUs); // shorter than Ethernet: not IPv4 either
    }
    let eth_proto: u16 = read(ctx, 12)?;
    if eth_proto != ETH_P_IP_BE {
        return Ok(Parsed::NotForUs);
    }
    ensure_linear(ctx, ETH_HLEN + 20)?;
    let ip: Ipv4Fixed = read(ctx, ETH_HLEN)?;
    let ihl_len = ((ip.version_ihl & 0x0f) as u32) * 4;
    let mut tot_len = u16::from_be(ip.tot_len_be) as u32;
    if tot_len == 0 && ip.proto == IPPROTO_TCP && ctx.len() > ETH_HLEN + 0xffff {
        // IPv4 BIG TCP: a GRO/GSO packet past 64 KiB carries total length 0;
        // its length is the skb's (as the kernel's iph_totlen()).
        tot_len = ctx.len() - ETH_HLEN;
    }
    if ip.version_ihl >> 4 != 4
        || ihl_len < 20
        || tot_len < ihl_len
        || ETH_HLEN + tot_len > ctx.len()
    {
        return Err(());
    }
    let frag = u16::from_be(ip.frag_off_be);
    if ip.proto == IPPROTO_ICMP {
        if frag & (IP_OFFSET_MASK | IP_MF) != 0 {
            return Ok(Parsed::NotForUs);
        }
        return parse_icmp_error(ctx, &ip, ihl_len, tot_len);
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Ok(Parsed::NotForUs);
    }
    if frag & IP_OFFSET_MASK != 0 {
        return Ok(Parsed::Fragment(Fragment {
            saddr_be: ip.saddr_be,
            daddr_be: ip.daddr_be,
            id_be: ip.id_be,
            proto: ip.proto,
            tot_len: tot_len as u16,
        }));
    }
    let is_fragment = frag & IP_MF != 0;

    let l4_off = ETH_HLEN + ihl_len;
    let l4_len = tot_len - ihl_len;
    let l4_header = if ip.proto == IPPROTO_TCP { 20 } else { 8 };
    if l4_len < l4_header {
        return Err(());
    }
    ensure_linear(ctx, l4_off + l4_header)?;
    let mut tcp_flags = 0;
    if ip.proto == IPPROTO_TCP {
        if l4_len < 20 {
            return Err(());
        }
        let [doff, flags]: [u8; 2] = read(ctx, l4_off + 12)?;
        let doff_len = ((doff >> 4) as u32) * 4;
        if doff_len < 20 || doff_len > l4_len {
            return Err(());
        }
        tcp_flags = flags;
    } else {
        if l4_len < 8 {
            return Err(());
        }
        let udp_len = u16::from_be(read::<u16>(ctx, l4_off + 4)?) as u32;
        // A first fragment carries only part of the datagram its length describes.
        if udp_len < 8 || (!is_fragment && udp_len > l4_len) {
            return Err(());
        }
    }
    let [sport_be, dport_be]: [u16; 2] = read(ctx, l4_off)?;
    Ok(Parsed::Packet(Packet {
        saddr_be: ip.saddr_be,
        daddr_be: ip.daddr_be,
        sport_be,
        dport_be,
        proto: ip.proto,
        tcp_flags,
        is_fragment,
        id_be: ip.id_be,
        ihl_len,
        l4_off,
        tot_len: tot_len as u16,
        dont_fragment: frag & IP_DF != 0,
    }))
}

/// ICMP types that quote the packet they are about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;

/// An ICMP error quoting the first bytes of a TCP or UDP packet (the
/// quoted IPv4 header and at least its ports); anything else is not ours.
#[inline(always)]
fn parse_icmp_error(
    ctx: &TcContext,
    ip: &Ipv4Fixed,
    ihl_len: u32,
    tot_len: u32,
) -> Result<Parsed, ()> {
    let icmp_off = ETH_HLEN + ihl_len;
    let end = ETH_HLEN + tot_len;
    if icmp_off + 8 + 20 + 8 > end {
        return Ok(Parsed::NotForUs); // too short to quote a transport header
    }
    ensure_linear(ctx, icmp_off + 8 + 20)?;
    let [icmp_type, _code]: [u8; 2] = read(ctx, icmp_off)?;
    if icmp_type != ICMP_DEST_UNREACH
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETER_PROB
    {
        return Ok(Parsed::NotForUs);
    }
    let inner_ip_off = icmp_off + 8;
    let inner: Ipv4Fixed = read(ctx, inner_ip_off)?;
    let inner_ihl = ((inner.version_ihl & 0x0f) as u32) * 4;
    if inner.version_ihl >> 4 != 4 || inner_ihl < 20 || inner_ihl > 60 {
        return Ok(Parsed::NotForUs);
    }
    if (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP)
        || u16::from_be(inner.frag_off_be) & IP_OFFSET_MASK != 0
    {
        return Ok(Parsed::NotForUs);
    }
    let inner_l4_off = inner_ip_off + inner_ihl;
    if inner_l4_off + 8 > end {
        return Ok(Parsed::NotForUs);
    }
    ensure_linear(ctx, inner_l4_off + 8)?;
    let [inner_sport_be, inner_dport_be]: [u16; 2] = read(ctx, inner_l4_off)?;
    // The quoted transport checksum, when the quote reaches it (a router
    // may quote only 8 bytes: a TCP checksum is then not there).
    let csum_off = inner_l4_off + crate::icmp::l4_csum_at(inner.proto);
    let inner_l4_csum_off = if csum_off + 2 <= end && ensure_linear(ctx, csum_off + 2).is_ok() {
        Some(csum_off)
    } else {
        None
    };
    Ok(Parsed::IcmpError(IcmpError {
        outer_saddr_be: ip.saddr_be,
        outer_daddr_be: ip.daddr_be,
        icmp_off,
        inner_ip_off,
        inner_l4_off,
        inner_saddr_be: inner.saddr_be,
        inner_daddr_be: inner.daddr_be,
        inner_sport_be,
        inner_dport_be,
        inner_proto: inner.proto,
        inner_l4_csum_off,
    }))
}
