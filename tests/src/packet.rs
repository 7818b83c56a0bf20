//! A small builder for Ethernet/IPv4|IPv6/TCP|UDP frames with correct
//! checksums, and checksum verification for frames the datapath produced.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

#[derive(Clone, Debug)]
pub struct Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    pub ip_options: Vec<u8>,
    /// Raw flags + fragment offset field.
    pub frag: u16,
    pub ttl: u8,
    pub id: u16,
    /// UDP only: send a zero ("no checksum") checksum.
    pub udp_no_checksum: bool,
}

impl Packet {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            src,
            dst,
            proto: 6,
            tcp_flags: flags,
            seq: 0x1000_0000,
            ack: if flags & TCP_ACK != 0 { 0x2000_0000 } else { 0 },
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            ttl: 64,
            id: 0x1234,
            udp_no_checksum: false,
        }
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self {
            proto: 17,
            tcp_flags: 0,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn to(mut self, dst: SocketAddrV4) -> Self {
        self.dst = dst;
        self
    }

    pub fn from(mut self, src: SocketAddrV4) -> Self {
        self.src = src;
        self
    }

    /// The reply a peer would send: addresses, ports and MACs swapped.
    pub fn reply(&self, flags: u8) -> Self {
        Self {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src: self.dst,
            dst: self.src,
            tcp_flags: flags,
            seq: 0x2000_0000,
            ack: self.seq.wrapping_add(1),
            ..self.clone()
        }
    }

    pub fn l4_header_len(&self) -> usize {
        if self.proto == 6 {
            20
        } else {
            8
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let ihl_len = 20 + self.ip_options.len();
        assert!(
            ihl_len.is_multiple_of(4) && ihl_len <= 60,
            "IP options must pad to 4 bytes"
        );
        let l4_len = self.l4_header_len() + self.payload.len();
        let mut f = Vec::with_capacity(14 + ihl_len + l4_len);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        let ip_start = f.len();
        f.push(0x40 | (ihl_len / 4) as u8);
        f.push(0);
        f.extend_from_slice(&((ihl_len + l4_len) as u16).to_be_bytes());
        f.extend_from_slice(&self.id.to_be_bytes());
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.push(self.ttl);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.ip().octets());
        f.extend_from_slice(&self.dst.ip().octets());
        f.extend_from_slice(&self.ip_options);
        let csum = checksum(&f[ip_start..ip_start + ihl_len], 0);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&csum.to_be_bytes());
        let l4_start = f.len();
        f.extend_from_slice(&self.src.port().to_be_bytes());
        f.extend_from_slice(&self.dst.port().to_be_bytes());
        if self.proto == 6 {
            f.extend_from_slice(&self.seq.to_be_bytes());
            f.extend_from_slice(&self.ack.to_be_bytes());
            f.push(5 << 4);
            f.push(self.tcp_flags);
            f.extend_from_slice(&0xffffu16.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        } else {
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        f.extend_from_slice(&self.payload);
        let csum_at = l4_start + if self.proto == 6 { 16 } else { 6 };
        if !(self.proto == 17 && self.udp_no_checksum) {
            let mut c = checksum(
                &f[l4_start..],
                pseudo_sum(*self.src.ip(), *self.dst.ip(), self.proto, l4_len),
            );
            if self.proto == 17 && c == 0 {
                c = 0xffff;
            }
            f[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        }
        f
    }
}

impl Packet {
    /// The datagram as its sender's stack fragments it: its IP payload
    /// (transport header and payload, checksummed whole) cut into pieces of
    /// at most `piece` bytes (a multiple of 8), each with its own IPv4
    /// header (offset, MF, length, checksum from scratch). The packet's own
    /// flags field should have DF clear.
    pub fn fragments(&self, piece: usize) -> Vec<Vec<u8>> {
        assert!(piece.is_multiple_of(8) && piece > 0);
        let whole = self.build();
        let ihl_len = usize::from(whole[14] & 0x0f) * 4;
        let (head, body) = whole.split_at(14 + ihl_len);
        let pieces: Vec<&[u8]> = body.chunks(piece).collect();
        pieces
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let mut f = head.to_vec();
                let more = if i + 1 < pieces.len() { 0x2000 } else { 0 };
                let field = self.frag & 0x4000 | more | (i * piece / 8) as u16;
                f[16..18].copy_from_slice(&((ihl_len + chunk.len()) as u16).to_be_bytes());
                f[20..22].copy_from_slice(&field.to_be_bytes());
                f[24..26].copy_from_slice(&[0, 0]);
                let csum = checksum(&f[14..14 + ihl_len], 0);
                f[24..26].copy_from_slice(&csum.to_be_bytes());
                f.extend_from_slice(chunk);
                f
            })
            .collect()
    }
}

/// An ICMP error frame from `from` to `to` quoting `quoted` (its IPv4
/// header and the first `quote` bytes after it; `None`: all of it), with
/// `rest` in bytes 4..8 of the ICMP header (the next-hop MTU of
/// "fragmentation needed"). Checksums computed from scratch.
pub fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: u32,
    quoted: &Packet,
    quote: Option<usize>,
) -> Vec<u8> {
    let inner = quoted.build();
    let inner_ip = &inner[14..];
    let ihl = usize::from(inner_ip[0] & 0x0f) * 4;
    let quoted_len = quote.map_or(inner_ip.len(), |n| (ihl + n).min(inner_ip.len()));
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(&inner_ip[..quoted_len]);
    let csum = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let mut f = Vec::with_capacity(34 + icmp.len());
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0xc0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x43, 0x21, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    let csum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Internet checksum of `data` starting from a partial `seed`.
pub fn checksum(data: &[u8], seed: u32) -> u16 {
    fold(sum16(data, seed))
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut s = sum16(&src.octets(), 0);
    s = sum16(&dst.octets(), s);
    s + u32::from(proto) + len as u32
}

/// Checks the IPv4 header checksum and the TCP/UDP/ICMP checksum of a
/// frame (of a fragment, the IPv4 header's only: its transport checksum
/// covers the whole datagram).
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if frame.get(12..14) == Some(&[0x86, 0xdd]) {
        return verify_checksums6(frame);
    }
    let ip = frame.get(14..).ok_or("short frame")?;
    let ihl_len = usize::from(ip[0] & 0x0f) * 4;
    if checksum(&ip[..ihl_len], 0) != 0 {
        return Err("bad IPv4 header checksum".into());
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Ok(());
    }
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &ip[ihl_len..tot_len];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let ok = match ip[9] {
        1 => checksum(l4, 0) == 0,
        6 => checksum(l4, pseudo_sum(src, dst, 6, l4.len())) == 0,
        17 => {
            let stored = u16::from_be_bytes([l4[6], l4[7]]);
            stored == 0 || checksum(l4, pseudo_sum(src, dst, 17, l4.len())) == 0
        }
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("bad L4 checksum (protocol {})", ip[9]))
    }
}

/// Renders a frame as hex, 16 bytes a line, for assertion messages.
pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts a frame the datapath produced equals `expected`, byte for byte
/// (shown in hex when not), and that its checksums are valid.
pub fn assert_frame(actual: &[u8], expected: &[u8], what: &str) {
    assert!(
        actual == expected,
        "{what}: frame differs\nexpected:\n{}\nactual:\n{}",
        hex(expected),
        hex(actual)
    );
    verify_checksums(actual).unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// An Ethernet/IPv6/TCP|UDP frame, with extension headers between the
/// fixed header and the transport header when asked, checksums from
/// scratch (the IPv6 pseudo-header: addresses, upper-layer length, next
/// header).
#[derive(Clone, Debug)]
pub struct Packet6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    /// Extension headers in order: (its type, its bytes after the
    /// next-header byte; the length byte included, padded to 8 in all).
    pub ext: Vec<(u8, Vec<u8>)>,
    pub hop_limit: u8,
}

/// IPv6 extension header types (RFC 8200).
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_DEST: u8 = 60;

impl Packet6 {
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            src,
            dst,
            proto: 6,
            tcp_flags: flags,
            seq: 0x1000_0000,
            ack: if flags & TCP_ACK != 0 { 0x2000_0000 } else { 0 },
            payload: Vec::new(),
            ext: Vec::new(),
            hop_limit: 64,
        }
    }

    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Self {
        Self {
            proto: 17,
            tcp_flags: 0,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// An options header (hop-by-hop or destination options) of `len8`
    /// 8-byte units, holding PadN only.
    pub fn with_options(mut self, kind: u8, len8: u8) -> Self {
        let total = usize::from(len8) * 8;
        let mut bytes = vec![len8 - 1, 1, (total - 4) as u8];
        bytes.resize(total - 1, 0);
        self.ext.push((kind, bytes));
        self
    }

    /// A fragment header: `offset` in 8-byte units, `more` fragments.
    pub fn with_fragment(mut self, offset: u16, more: bool, id: u32) -> Self {
        let field = offset << 3 | u16::from(more);
        let mut bytes = vec![0];
        bytes.extend_from_slice(&field.to_be_bytes());
        bytes.extend_from_slice(&id.to_be_bytes());
        self.ext.push((NEXTHDR_FRAGMENT, bytes));
        self
    }

    pub fn to(mut self, dst: SocketAddrV6) -> Self {
        self.dst = dst;
        self
    }

    pub fn from(mut self, src: SocketAddrV6) -> Self {
        self.src = src;
        self
    }

    /// The reply a peer would send: addresses, ports and MACs swapped, no
    /// extension headers.
    pub fn reply(&self, flags: u8) -> Self {
        Self {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src: self.dst,
            dst: self.src,
            tcp_flags: flags,
            seq: 0x2000_0000,
            ack: self.seq.wrapping_add(1),
            ext: Vec::new(),
            ..self.clone()
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let l4_len = if self.proto == 6 { 20 } else { 8 } + self.payload.len();
        let ext_len: usize = self.ext.iter().map(|(_, b)| 1 + b.len()).sum();
        let mut f = Vec::with_capacity(14 + 40 + ext_len + l4_len);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((ext_len + l4_len) as u16).to_be_bytes());
        f.push(self.ext.first().map_or(self.proto, |(kind, _)| *kind));
        f.push(self.hop_limit);
        f.extend_from_slice(&self.src.ip().octets());
        f.extend_from_slice(&self.dst.ip().octets());
        for (i, (_, bytes)) in self.ext.iter().enumerate() {
            f.push(self.ext.get(i + 1).map_or(self.proto, |(kind, _)| *kind));
            f.extend_from_slice(bytes);
        }
        let l4_start = f.len();
        f.extend_from_slice(&self.src.port().to_be_bytes());
        f.extend_from_slice(&self.dst.port().to_be_bytes());
        if self.proto == 6 {
            f.extend_from_slice(&self.seq.to_be_bytes());
            f.extend_from_slice(&self.ack.to_be_bytes());
            f.push(5 << 4);
            f.push(self.tcp_flags);
            f.extend_from_slice(&0xffffu16.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0]);
        } else {
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        f.extend_from_slice(&self.payload);
        let pseudo = pseudo_sum6(self.src.ip(), self.dst.ip(), self.proto, l4_len);
        let mut c = checksum(&f[l4_start..], pseudo);
        if self.proto == 17 && c == 0 {
            c = 0xffff;
        }
        let at = l4_start + if self.proto == 6 { 16 } else { 6 };
        f[at..at + 2].copy_from_slice(&c.to_be_bytes());
        f
    }
}

impl Packet6 {
    /// The datagram as its sender's stack fragments it (RFC 8200 4.5): its
    /// transport header and payload (checksummed whole) cut into pieces of
    /// at most `piece` bytes (a multiple of 8), each behind the IPv6
    /// header and a fragment header naming datagram `id`. The packet
    /// itself has no extension headers.
    pub fn fragments(&self, piece: usize, id: u32) -> Vec<Vec<u8>> {
        assert!(piece.is_multiple_of(8) && piece > 0 && self.ext.is_empty());
        let whole = self.build();
        let (head, body) = whole.split_at(14 + 40);
        let pieces: Vec<&[u8]> = body.chunks(piece).collect();
        pieces
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let mut f = head.to_vec();
                f[18..20].copy_from_slice(&((8 + chunk.len()) as u16).to_be_bytes());
                f[20] = NEXTHDR_FRAGMENT;
                let more = u16::from(i + 1 < pieces.len());
                let field = ((i * piece / 8) as u16) << 3 | more;
                f.extend_from_slice(&[self.proto, 0]);
                f.extend_from_slice(&field.to_be_bytes());
                f.extend_from_slice(&id.to_be_bytes());
                f.extend_from_slice(chunk);
                f
            })
            .collect()
    }
}

/// The ICMPv6 error the datapath answers `frame` (an IPv6 frame without
/// extension headers) with, as it builds it: MACs swapped, from `from` to
/// `to`, hop limit 64, `rest` in bytes 4..8 of the ICMPv6 header (packet
/// too big's MTU), quoting the IPv6 header and 8 bytes after it.
pub fn icmp6_error(
    frame: &[u8],
    from: Ipv6Addr,
    to: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    rest: u32,
) -> Vec<u8> {
    icmp6_error_quoting(frame, 48, from, to, icmp_type, code, rest)
}

/// `icmp6_error` quoting `quote` bytes of `frame`'s IPv6 packet (at most
/// all of it).
pub fn icmp6_error_quoting(
    frame: &[u8],
    quote: usize,
    from: Ipv6Addr,
    to: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    rest: u32,
) -> Vec<u8> {
    let quote = quote.min(frame.len() - 14);
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(&frame[14..14 + quote]);
    let sum = checksum(&icmp, pseudo_sum6(&from, &to, 58, icmp.len()));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(54 + icmp.len());
    f.extend_from_slice(&frame[6..12]);
    f.extend_from_slice(&frame[0..6]);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 64]);
    f.extend_from_slice(&from.octets());
    f.extend_from_slice(&to.octets());
    f.extend_from_slice(&icmp);
    f
}

pub fn pseudo_sum6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, len: usize) -> u32 {
    let mut s = sum16(&src.octets(), 0);
    s = sum16(&dst.octets(), s);
    s + u32::from(proto) + len as u32
}

/// The TCP/UDP/ICMPv6 checksum of an IPv6 frame, past its extension headers.
fn verify_checksums6(frame: &[u8]) -> Result<(), String> {
    let ip = frame.get(14..54).ok_or("short IPv6 frame")?;
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let end = 54 + payload;
    let (mut next, mut off) = (ip[6], 54);
    while matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT
    ) {
        let header = frame.get(off..off + 2).ok_or("short extension header")?;
        if next == NEXTHDR_FRAGMENT {
            return Ok(()); // a fragment's checksum covers the whole datagram
        }
        next = header[0];
        off += (usize::from(header[1]) + 1) * 8;
    }
    let l4 = frame.get(off..end).ok_or("short transport header")?;
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    match next {
        6 | 17 | 58 if checksum(l4, pseudo_sum6(&src, &dst, next, l4.len())) != 0 => {
            Err(format!("bad L4 checksum (protocol {next})"))
        }
        _ => Ok(()),
    }
}
