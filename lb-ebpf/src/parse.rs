//! Bounds-checked header parsing with direct packet access (the headers
//! are pulled into the linear area first when they are not there already):
//! IPv4 with its options, IPv6 with its extension headers walked (a
//! bounded walk; a packet it cannot finish passes untouched). Nothing is
//! read past the IP datagram's length.

use aya_ebpf::programs::TcContext;
use lb_common::{Ipv4, Ipv6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

pub use crate::icmp::{Icmp6Error, IcmpError};

pub const ETH_HLEN: u32 = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
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

pub const IP6_HLEN: u32 = 40;
pub const IP6_SADDR_OFF: u32 = ETH_HLEN + 8;
/// IPv6 extension headers (RFC 8200 4.1): hop-by-hop, routing, fragment,
/// destination options. Others end the walk (a transport, ESP, "no next
/// header", or one we do not know: not ours).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked at most. RFC 8200 allows each once (destination
/// options twice); a packet with more is passed untouched.
const MAX_EXT_HEADERS: u32 = 6;
const IP6_MF: u16 = 0x0001;
const IP6_OFFSET_MASK: u16 = 0xfff8;

/// The fixed IPv6 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Fixed {
    version_class_flow: [u8; 4],
    payload_len_be: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: Ipv6,
    daddr: Ipv6,
}

/// A TCP or UDP packet whose headers are complete, of either family
/// (`A`: its address type, `Ipv4` or `Ipv6`).
pub struct Packet<A = Ipv4> {
    pub saddr: A,
    pub daddr: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// First fragment of a fragmented datagram (later ones are `Fragment`s).
    pub is_fragment: bool,
    /// The IPv4 header's identification (names the datagram of a
    /// fragment; IPv6's is in the fragment header). Field order matters
    /// here: a `Packet` laid out without it took `lb_ingress6` past the
    /// verifier's million instructions (its spills no longer pruned).
    pub id_be: u16,
    /// IP header length in bytes: IPv4's with options (20 without),
    /// IPv6's with its extension headers.
    pub ihl_len: u32,
    pub l4_off: u32,
    /// The IP datagram's length (a GSO packet's is its segments' together).
    pub tot_len: u16,
    /// A router must not fragment it (IPv4 DF; IPv6 always).
    pub dont_fragment: bool,
}

impl Packet {
    /// The IPv4 source as the header holds it, read as a native `u32`.
    #[inline(always)]
    pub fn saddr_be(&self) -> u32 {
        u32::from_ne_bytes(self.saddr)
    }

    #[inline(always)]
    pub fn daddr_be(&self) -> u32 {
        u32::from_ne_bytes(self.daddr)
    }
}

/// A later fragment of a TCP or UDP datagram: no transport header (its
/// addresses are read from the header where they are used).
pub struct Fragment {
    /// The datagram's identification, host order (IPv4's 16-bit header
    /// field, IPv6's 32-bit fragment header field).
    pub id: u32,
    pub proto: u8,
    pub tot_len: u16,
}

pub enum Parsed {
    Packet(Packet),
    /// An IPv6 packet: the IPv6 programs' (`family6`).
    Ipv6,
    /// A non-first fragment (see `frag`).
    Fragment(Fragment),
    /// An ICMP error quoting a TCP or UDP packet (see `icmp`).
    IcmpError(IcmpError),
    /// Not IPv4 TCP/UDP (nor an ICMP error about it): not ours to touch.
    NotForUs,
    /// Headers truncated or inconsistent: never rewritten.
    Malformed,
}

/// What the IPv6 programs see.
pub enum Parsed6 {
    Packet(Packet<Ipv6>),
    /// An ICMPv6 error (destination unreachable, packet too big, time
    /// exceeded, parameter problem): parsed and translated by a program
    /// of its own (`parse_icmp6_error`; its 100-byte parse did not fit the
    /// IPv6 programs' stack).
    IcmpError,
    /// A fragment, to the fragment programs (`parse6`).
    Fragmented,
    /// A non-first fragment, in the fragment programs; `frag::stash`ed:
    /// with its parse in the variant, the first fragment's path cost the
    /// verifier three times as much.
    Fragment,
    /// Not IPv6 TCP/UDP: not ours to touch. Also neighbour discovery,
    /// router advertisements, MLD and every other ICMPv6 message but the
    /// errors, fragments whose fragmentable part does not start with the
    /// transport header, and packets whose extension headers the walk does
    /// not finish.
    NotForUs,
    Malformed,
}

impl<A> Packet<A> {
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

/// The start and end of the linear data, read afresh at each use
/// (volatile): a pointer LLVM keeps across the IPv6 header walk it merges
/// with other values and zero-extends by shifts, which the verifier
/// refuses on a packet pointer.
#[inline(always)]
fn data(ctx: &TcContext) -> usize {
    // SAFETY: the context's skb is valid for the program run.
    unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).data) as usize }
}

#[inline(always)]
fn data_end(ctx: &TcContext) -> usize {
    // SAFETY: as `data`.
    unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).data_end) as usize }
}

/// A pointer to a `T` at `off`, if the linear data holds all of it.
#[inline(always)]
fn at<T>(ctx: &TcContext, off: u32) -> Result<*const T, ()> {
    let start = data(ctx) + off as usize;
    if start + core::mem::size_of::<T>() > data_end(ctx) {
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
    if data(ctx) + len as usize <= data_end(ctx) {
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
    if eth_proto == ETH_P_IPV6_BE {
        return Ok(Parsed::Ipv6);
    }
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
            id: u32::from(u16::from_be(ip.id_be)),
            proto: ip.proto,
            tot_len: tot_len as u16,
        }));
    }
    let is_fragment = frag & IP_MF != 0;

    let l4_off = ETH_HLEN + ihl_len;
    let l4 = parse_l4(ctx, ip.proto, l4_off, tot_len - ihl_len, is_fragment)?;
    Ok(Parsed::Packet(Packet {
        saddr: lb_common::ipv4(ip.saddr_be),
        daddr: lb_common::ipv4(ip.daddr_be),
        sport_be: l4.sport_be,
        dport_be: l4.dport_be,
        proto: ip.proto,
        tcp_flags: l4.tcp_flags,
        is_fragment,
        id_be: ip.id_be,
        ihl_len,
        l4_off,
        tot_len: tot_len as u16,
        dont_fragment: frag & IP_DF != 0,
    }))
}

/// An IPv6 packet: the extension headers walked to the transport header.
/// An atomic fragment header (offset 0, no more fragments) is walked over.
/// A real fragment is `Fragmented` to the programs that take whole packets;
/// the fragment programs (`FRAGMENTS`) parse it, the first as a `Packet`
/// (`is_fragment`), the later ones as `Fragment`s — if the transport header
/// follows the fragment header, as Linux and every stack we know fragment;
/// otherwise all of its datagram passes untouched. Two parses, not one: a
/// packet that may or may not be a fragment doubled the paths the verifier
/// walks after the parse (past its million instructions for `lb_ingress6`).
#[inline(always)]
pub fn parse6<const FRAGMENTS: bool>(ctx: &TcContext) -> Parsed6 {
    match try_parse6::<FRAGMENTS>(ctx) {
        Ok(parsed) => parsed,
        Err(()) => Parsed6::Malformed,
    }
}

#[inline(always)]
const fn is_ipv6(ethertype_be: u16) -> bool {
    ethertype_be == ETH_P_IPV6_BE
}

#[inline(always)]
fn try_parse6<const FRAGMENTS: bool>(ctx: &TcContext) -> Result<Parsed6, ()> {
    if ensure_linear(ctx, ETH_HLEN).is_err() || !is_ipv6(read(ctx, 12)?) {
        return Ok(Parsed6::NotForUs);
    }
    ensure_linear(ctx, ETH_HLEN + IP6_HLEN)?;
    let ip: Ipv6Fixed = read(ctx, ETH_HLEN)?;
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(());
    }
    let mut payload = u32::from(u16::from_be(ip.payload_len_be));
    if payload == 0 && ctx.len() > ETH_HLEN + IP6_HLEN + 0xffff {
        // IPv6 BIG TCP: GRO strips the jumbo option and leaves length 0;
        // the skb's length is the datagram's (as ipv6_payload_len()).
        payload = ctx.len() - ETH_HLEN - IP6_HLEN;
    }
    let end = ETH_HLEN + IP6_HLEN + payload;
    if end > ctx.len() {
        return Err(());
    }
    let mut next = ip.next_header;
    let mut off = ETH_HLEN + IP6_HLEN;
    let mut walked = 0;
    while walked < MAX_EXT_HEADERS {
        let len = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                ensure_linear(ctx, off + 2)?;
                let [next_header, ext_len]: [u8; 2] = read(ctx, off)?;
                next = next_header;
                (u32::from(ext_len) + 1) * 8
            }
            NEXTHDR_FRAGMENT => {
                ensure_linear(ctx, off + 4)?;
                let [next_header, _reserved, frag_hi, frag_lo]: [u8; 4] = read(ctx, off)?;
                if u16::from_be_bytes([frag_hi, frag_lo]) & (IP6_OFFSET_MASK | IP6_MF) != 0 {
                    if !FRAGMENTS {
                        return Ok(Parsed6::Fragmented);
                    }
                    break; // at the fragment header, `next` naming it
                }
                next = next_header;
                8
            }
            _ => break,
        };
        off += len;
        if off > end {
            return Err(());
        }
        walked += 1;
    }
    if FRAGMENTS {
        if next != NEXTHDR_FRAGMENT {
            return Ok(Parsed6::NotForUs); // not a fragment: the other programs'
        }
        ensure_linear(ctx, off + 8)?;
        let [next_header, _reserved, frag_hi, frag_lo]: [u8; 4] = read(ctx, off)?;
        if next_header != IPPROTO_UDP {
            return Ok(Parsed6::NotForUs);
        }
        if u16::from_be_bytes([frag_hi, frag_lo]) & IP6_OFFSET_MASK != 0 {
            let later = Fragment {
                id: u32::from_be(read(ctx, off + 4)?),
                proto: IPPROTO_UDP,
                tot_len: (end - ETH_HLEN).min(0xffff) as u16,
            };
            crate::frag::stash::<Ipv6>(&later)?;
            return Ok(Parsed6::Fragment);
        }
        // The transport header follows: `frag::record` finds the
        // identification just before it.
        next = IPPROTO_UDP;
        off += 8;
        if off > end {
            return Err(());
        }
    }
    if next == IPPROTO_ICMPV6 && off == ETH_HLEN + IP6_HLEN {
        return icmp6_kind(ctx, end);
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Ok(Parsed6::NotForUs);
    }
    let l4 = parse_l4(ctx, next, off, end - off, FRAGMENTS)?;
    Ok(Parsed6::Packet(Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport_be: l4.sport_be,
        dport_be: l4.dport_be,
        proto: next,
        tcp_flags: l4.tcp_flags,
        is_fragment: FRAGMENTS,
        id_be: 0,
        ihl_len: off - ETH_HLEN,
        l4_off: off,
        tot_len: (end - ETH_HLEN).min(0xffff) as u16,
        dont_fragment: true,
    }))
}

/// What the transport header says, once checked against the datagram.
struct L4 {
    sport_be: u16,
    dport_be: u16,
    tcp_flags: u8,
}

/// The TCP or UDP header at `l4_off`, `l4_len` bytes to the datagram's end.
#[inline(always)]
fn parse_l4(
    ctx: &TcContext,
    proto: u8,
    l4_off: u32,
    l4_len: u32,
    is_fragment: bool,
) -> Result<L4, ()> {
    let l4_header = if proto == IPPROTO_TCP { 20 } else { 8 };
    if l4_len < l4_header {
        return Err(());
    }
    ensure_linear(ctx, l4_off + l4_header)?;
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        let [doff, flags]: [u8; 2] = read(ctx, l4_off + 12)?;
        let doff_len = ((doff >> 4) as u32) * 4;
        if doff_len < 20 || doff_len > l4_len {
            return Err(());
        }
        tcp_flags = flags;
    } else {
        let udp_len = u16::from_be(read::<u16>(ctx, l4_off + 4)?) as u32;
        // A first fragment carries only part of the datagram its length describes.
        if udp_len < 8 || (!is_fragment && udp_len > l4_len) {
            return Err(());
        }
    }
    let [sport_be, dport_be]: [u16; 2] = read(ctx, l4_off)?;
    Ok(L4 {
        sport_be,
        dport_be,
        tcp_flags,
    })
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

/// ICMPv6 error types (RFC 4443), each quoting the packet it is about.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;

#[inline(always)]
const fn is_icmp6_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB
    )
}

/// An ICMPv6 error right after the fixed header (an error with extension
/// headers passes untranslated: with the walk's variable offsets the
/// translation took the verifier past a million instructions).
#[inline(always)]
fn icmp6_kind(ctx: &TcContext, end: u32) -> Result<Parsed6, ()> {
    const ICMP_OFF: u32 = ETH_HLEN + IP6_HLEN;
    // Type, code and checksum, read whole (a 1-byte read here lost its
    // bounds to the verifier).
    if ICMP_OFF + 4 > end {
        return Err(());
    }
    ensure_linear(ctx, ICMP_OFF + 4)?;
    let [icmp_type, _code, _, _]: [u8; 4] = read(ctx, ICMP_OFF)?;
    Ok(if is_icmp6_error(icmp_type) {
        Parsed6::IcmpError
    } else {
        Parsed6::NotForUs
    })
}

/// The ICMPv6 error `parse6` found (`Parsed6::IcmpError`), when it quotes
/// an IPv6 header and at least the ports of the TCP or UDP header right
/// after it; `None` for a quote with extension headers, of anything else,
/// or too short.
#[inline(always)]
pub fn parse_icmp6_error(ctx: &TcContext) -> Result<Option<Icmp6Error>, ()> {
    let icmp_off = ETH_HLEN + IP6_HLEN;
    ensure_linear(ctx, icmp_off)?;
    if !is_ipv6(read(ctx, 12)?) {
        return Ok(None);
    }
    let ip: Ipv6Fixed = read(ctx, ETH_HLEN)?;
    let end = icmp_off + u32::from(u16::from_be(ip.payload_len_be));
    if ip.next_header != IPPROTO_ICMPV6 || end > ctx.len() {
        return Ok(None);
    }
    let inner_ip_off = icmp_off + 8;
    let inner_l4_off = inner_ip_off + IP6_HLEN;
    if inner_l4_off + 8 > end {
        return Ok(None);
    }
    ensure_linear(ctx, inner_l4_off + 8)?;
    let [icmp_type, _code]: [u8; 2] = read(ctx, icmp_off)?;
    if !is_icmp6_error(icmp_type) {
        return Ok(None);
    }
    let inner: Ipv6Fixed = read(ctx, inner_ip_off)?;
    if inner.version_class_flow[0] >> 4 != 6
        || (inner.next_header != IPPROTO_TCP && inner.next_header != IPPROTO_UDP)
    {
        return Ok(None);
    }
    let [inner_sport_be, inner_dport_be]: [u16; 2] = read(ctx, inner_l4_off)?;
    // The quoted transport checksum, when the quote reaches it.
    let csum_off = inner_l4_off + crate::icmp::l4_csum_at(inner.next_header);
    let inner_l4_csum_off = if csum_off + 2 <= end && ensure_linear(ctx, csum_off + 2).is_ok() {
        Some(csum_off)
    } else {
        None
    };
    Ok(Some(Icmp6Error {
        outer_saddr: ip.saddr,
        icmp_off,
        inner_ip_off,
        inner_saddr: inner.saddr,
        inner_daddr: inner.daddr,
        inner_sport_be,
        inner_dport_be,
        inner_proto: inner.next_header,
        inner_l4_csum_off,
    }))
}
