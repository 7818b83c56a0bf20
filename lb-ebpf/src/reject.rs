//! A new flow to a frontend with no backends is answered, like kube-proxy's
//! REJECT rule, with ICMP port unreachable from the VIP: TCP clients get
//! ECONNREFUSED at once, connected UDP sockets get ECONNREFUSED on their next
//! call. A routed packet too big for the way out is answered with
//! "fragmentation needed". The packet is rebuilt in place and sent back out
//! the interface it came in on.
//!
//! Only packets without IP options are answered (fixed 28-byte quote);
//! others are dropped and counted (`drop_reject`).
//!
//! The answer is built in the packet's own skb, so it keeps the packet's
//! checksum state. A packet whose transport checksum is still owed
//! (CHECKSUM_PARTIAL: sent by a local socket over a veth, merged by GRO,
//! received from virtio) has it computed at transmit — by the NIC, or by
//! the kernel when the device does not checksum (`ethtool -K … tx off`) —
//! from the transport header to the end, written at the TCP or UDP
//! checksum's place: inside the quote (TCP) or over the MTU (UDP) of the
//! answer. A tc program can neither see nor reset that state, so the
//! answer is laid out to make the owed computation a no-op: two bytes of
//! link-layer padding after the IP datagram hold the complement of the
//! word at that place, so the sum computed there is that very word. A
//! receiver over a veth, which trusts a CHECKSUM_PARTIAL packet, reads the
//! same bytes. An owed SCTP checksum (CRC32c) cannot be neutralised so:
//! such a packet is dropped unanswered. Answers are
//! rate-limited per CPU (`lb_common::icmp`); a packet past the limit is
//! dropped unanswered (`drop_icmp_rate_limited`).

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use lb_common::{
    icmp::IcmpLimit, stats::Stat, Ipv6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    csum,
    maps::{ANSWER6_SCRATCH, ICMP_BUCKET},
    parse::{Packet, ETH_HLEN, IP6_HLEN},
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
/// The Ethernet and IPv4 headers of the packet and of its answer.
const HEADERS_LEN: u32 = ETH_HLEN + 20;
/// Where an owed TCP checksum lands in the answer: the quoted IP header's
/// TTL and protocol (quote bytes 8–9); an owed UDP one: the MTU field.
const OWED_TCP_AT: u32 = HEADERS_LEN + 16;
const OWED_UDP_AT: u32 = HEADERS_LEN + 6;

/// IPv6: destination unreachable, port unreachable (RFC 4443), quoting the
/// IPv6 header and 8 bytes of the transport header; packets with
/// extension headers are dropped unanswered (`drop_reject`), as IPv4
/// packets with options are.
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const QUOTE6_LEN: u32 = IP6_HLEN + 8;
const REPLY6_PAYLOAD_LEN: u32 = 8 + QUOTE6_LEN;
const HEADERS6_LEN: u32 = ETH_HLEN + IP6_HLEN;
/// Where an owed checksum lands in the IPv6 answer: the quoted header's
/// bytes 8–9 (TCP: the first word of its source), or the ICMPv6 header's
/// bytes 6–7 (UDP: zero in a port unreachable, the MTU's low half in a
/// packet too big).
const OWED6_TCP_AT: u32 = HEADERS6_LEN + 16;
const OWED6_UDP_AT: u32 = HEADERS6_LEN + 6;

/// An address in the service CIDRs that no frontend holds, answered as
/// kube-proxy's nftables rules answer it.
#[inline(always)]
pub fn service_cidr(ctx: &TcContext, pkt: &Packet) -> Outcome {
    answer(ctx, pkt, ICMP_PORT_UNREACH, 0, Stat::RejectServiceCidr)
}

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

/// A new IPv6 flow to a frontend with no backends: ICMPv6 port unreachable
/// from the frontend, sent back out the way it came (as `port_unreachable`).
#[inline(always)]
pub fn port_unreachable6(ctx: &TcContext, pkt: &Packet<Ipv6>) -> Outcome {
    answer6(
        ctx,
        pkt,
        [ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH],
        0,
        Stat::RejectNoBackend,
    )
}

/// As `service_cidr`, for an IPv6 service CIDR.
#[inline(always)]
pub fn service_cidr6(ctx: &TcContext, pkt: &Packet<Ipv6>) -> Outcome {
    answer6(
        ctx,
        pkt,
        [ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH],
        0,
        Stat::RejectServiceCidr,
    )
}

/// A routed (SNATed) IPv6 packet too big for the way out: ICMPv6 packet too
/// big with the next hop's MTU, from the address it was sent to (IPv6
/// routers never fragment: the sender's path-MTU discovery needs it).
#[inline(always)]
pub fn packet_too_big6(ctx: &TcContext, pkt: &Packet<Ipv6>, mtu: u16) -> Outcome {
    answer6(
        ctx,
        pkt,
        [ICMPV6_PACKET_TOO_BIG, 0],
        mtu,
        Stat::IcmpFragNeeded,
    )
}

#[inline(always)]
fn answer6(ctx: &TcContext, pkt: &Packet<Ipv6>, kind: [u8; 2], mtu: u16, stat: Stat) -> Outcome {
    if !allowed() {
        return Outcome::drop(Stat::DropIcmpRateLimited);
    }
    match build6(ctx, pkt, kind, mtu) {
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
    let owed = owed_checksum(ctx, pkt.proto)?;
    let frame_len = ETH_HLEN + REPLY_IP_LEN + if owed.is_some() { 2 } else { 0 };
    if change_tail(ctx, frame_len) != 0 {
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
    ip.0[12..16].copy_from_slice(&pkt.daddr); // from the VIP
    ip.0[16..20].copy_from_slice(&pkt.saddr); // to the client
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
        .map_err(|_| ())?;

    // The owed checksum then computes to the word already in its place.
    let Some(at) = owed else {
        return Ok(());
    };
    let [ttl, proto, ..] = quote[2].to_ne_bytes();
    let word = if at == OWED_TCP_AT {
        [ttl, proto]
    } else {
        [mtu_hi, mtu_lo]
    };
    let padding = !u16::from_ne_bytes(word);
    ctx.store((ETH_HLEN + REPLY_IP_LEN) as usize, &padding, 0)
        .map_err(|_| ())
}

/// `build` for IPv6. The ICMPv6 checksum covers a pseudo-header (the
/// addresses, the length, next header 58), so an owed checksum's padding
/// also cancels the message's own sum: the computation over message and
/// padding comes out as the word already in place.
#[inline(always)]
fn build6(ctx: &TcContext, pkt: &Packet<Ipv6>, kind: [u8; 2], mtu: u16) -> Result<(), ()> {
    if pkt.ihl_len != IP6_HLEN {
        return Err(());
    }
    let a = ANSWER6_SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's map value, valid for the program run; zero is a
    // valid value of every field (`mtu` was read before).
    let a = unsafe {
        core::ptr::write_bytes(a, 0, 1);
        &mut *a
    };
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    // The helper directly, with the quote's constant length (`load_bytes`
    // clamps it to the packet, a length the verifier sees may be 0).
    // SAFETY: the destination is the value's `QUOTE6_LEN` bytes.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            ETH_HLEN,
            a.quote.as_mut_ptr().cast(),
            QUOTE6_LEN,
        )
    };
    if loaded != 0 {
        return Err(());
    }
    let owed = owed_checksum_at(ctx, pkt.proto, HEADERS6_LEN, (OWED6_TCP_AT, OWED6_UDP_AT))?;
    let frame_len = HEADERS6_LEN + REPLY6_PAYLOAD_LEN + if owed.is_some() { 2 } else { 0 };
    if change_tail(ctx, frame_len) != 0 {
        return Err(());
    }

    let mut eth = [0u8; 14];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12..14].copy_from_slice(&[0x86, 0xdd]);

    a.ip[0] = 0x60;
    a.ip[4..6].copy_from_slice(&(REPLY6_PAYLOAD_LEN as u16).to_be_bytes());
    a.ip[6] = IPPROTO_ICMPV6;
    a.ip[7] = 64;
    a.ip[8..24].copy_from_slice(&pkt.daddr); // from the frontend
    a.ip[24..40].copy_from_slice(&pkt.saddr); // to the client
    a.pseudo_tail[2..4].copy_from_slice(&(REPLY6_PAYLOAD_LEN as u16).to_be_bytes());
    a.pseudo_tail[7] = IPPROTO_ICMPV6;
    // SAFETY: the addresses and the pseudo-header's tail after them: 40
    // contiguous bytes of the value, 4-aligned.
    let pseudo = csum::partial(unsafe { a.ip.as_mut_ptr().add(8).cast() }, 40, 0);

    let [mtu_hi, mtu_lo] = mtu.to_be_bytes();
    a.icmp = [kind[0], kind[1], 0, 0, 0, 0, mtu_hi, mtu_lo];
    let sum = csum::partial(a.icmp.as_mut_ptr().cast(), 8, pseudo);
    let icmp_csum = csum::fold(csum::partial(a.quote.as_mut_ptr().cast(), QUOTE6_LEN, sum));
    a.icmp[2..4].copy_from_slice(&icmp_csum.to_ne_bytes());

    ctx.store(0, &eth, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN as usize, &a.ip, 0).map_err(|_| ())?;
    ctx.store(HEADERS6_LEN as usize, &a.icmp, 0)
        .map_err(|_| ())?;
    ctx.store((HEADERS6_LEN + 8) as usize, &a.quote, 0)
        .map_err(|_| ())?;

    let Some(at) = owed else {
        return Ok(());
    };
    // The owed computation sums message and padding: the padding makes
    // that sum the complement of the word in place (the message, with its
    // checksum now in, sums to the pseudo-header's complement).
    let word = if at == OWED6_TCP_AT {
        u16::from_ne_bytes([a.quote[8], a.quote[9]])
    } else {
        u16::from_ne_bytes([mtu_hi, mtu_lo])
    };
    let with_checksum = csum::partial(a.icmp.as_mut_ptr().cast(), 8, 0);
    let with_checksum = csum::partial(a.quote.as_mut_ptr().cast(), QUOTE6_LEN, with_checksum);
    let sum = !csum::fold(with_checksum); // the message's own sum, folded
    let padding = csum::add16(!word, !sum);
    ctx.store((HEADERS6_LEN + REPLY6_PAYLOAD_LEN) as usize, &padding, 0)
        .map_err(|_| ())
}

/// An ICMPv6 answer's parts as they are built, in per-CPU scratch
/// (`maps::ANSWER6_SCRATCH`): on the stack they did not fit beside the
/// tracked path's. 4-aligned for the checksum helper.
#[repr(C, align(4))]
pub struct Answer6 {
    /// `packet_too_big6`'s MTU, handed over by its caller (`family6`).
    pub mtu: u32,
    /// The fixed IPv6 header; the pseudo-header's length and next header
    /// follow its addresses, so those 40 bytes are summed at once.
    ip: [u8; 40],
    pseudo_tail: [u8; 8],
    icmp: [u8; 8],
    /// The IPv6 header and 8 bytes of the transport header quoted.
    quote: [u8; QUOTE6_LEN as usize],
}

/// Where the packet's owed transport checksum will be written, if one is
/// owed. `bpf_skb_change_tail` refuses to cut an owed checksum's field
/// (the kernel's `__bpf_skb_min_len`), so: a trim to the headers that
/// succeeds means none is owed; otherwise the field ends exactly where a
/// trim to it succeeds and one byte shorter is refused. The packet is left
/// trimmed (its bytes were read before). An owed checksum anywhere but at
/// the TCP or UDP checksum of the transport header is an error.
#[inline(always)]
fn owed_checksum(ctx: &TcContext, proto: u8) -> Result<Option<u32>, ()> {
    owed_checksum_at(ctx, proto, HEADERS_LEN, (OWED_TCP_AT, OWED_UDP_AT))
}

/// `owed_checksum` for an answer whose headers end at `headers` and whose
/// owed TCP or UDP checksum lands at `(tcp, udp)`.
#[inline(always)]
fn owed_checksum_at(
    ctx: &TcContext,
    proto: u8,
    headers: u32,
    (tcp, udp): (u32, u32),
) -> Result<Option<u32>, ()> {
    if change_tail(ctx, headers) == 0 {
        return Ok(None);
    }
    let at = match proto {
        IPPROTO_TCP => tcp,
        IPPROTO_UDP => udp,
        _ => return Err(()),
    };
    if change_tail(ctx, at + 2) == 0 && change_tail(ctx, at + 1) != 0 {
        Ok(Some(at))
    } else {
        Err(())
    }
}

#[inline(always)]
fn change_tail(ctx: &TcContext, len: u32) -> i64 {
    unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) }
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
