//! Sending a SNATed packet on without the node's input path: its source
//! (forward: the node itself; reply: a frontend on the node) would be a
//! martian there. It is routed here instead, as the kernel would forward
//! it: TTL (IPv6: hop limit) decremented, next hop and neighbour from the FIB. A known
//! neighbour gets the MACs written here and a plain `bpf_redirect`; an
//! unresolved one is left to `bpf_redirect_neigh` with the next hop. The
//! route is looked up before the packet is translated: one too big for
//! the way out is answered in the sender's terms, as the kernel's
//! forwarding would: "fragmentation needed" (`reject::frag_needed`), or
//! IPv6 packet too big (`lb_too_big6`).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::{Ipv4, Ipv6};

use crate::{
    family::Family,
    parse::{ETH_HLEN, IP_CSUM_OFF},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IP_TTL_OFF: usize = ETH_HLEN as usize + 8;
const IP6_HOP_LIMIT_OFF: usize = ETH_HLEN as usize + 7;

/// Where forwarding sends a packet. A plain struct, every field always
/// set: the verifier rejects reads of enum payload registers that one arm
/// leaves unset.
pub struct Route {
    pub way: Way,
    pub ifindex: u32,
    /// `Way::Neigh`: the next hop (gateway or destination), as the FIB
    /// gives it (IPv4: the first word).
    pub next_hop: [u32; 4],
    /// `Way::TooBig`: the MTU of the way out.
    pub mtu: u16,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// The neighbour is known (its MAC and ours are already written:
    /// translation leaves the Ethernet header alone).
    Mac,
    /// The next hop's neighbour entry is still to be resolved.
    Neigh,
    /// Too big for the way out (the route's or the device's MTU).
    TooBig,
}

/// What forwarding differs in between the families: the FIB's address
/// fields, and the hop count (IPv4's TTL is under the header checksum).
pub trait Forward: Family {
    const AF: u8;
    /// # Safety
    /// `fib` is valid for writes.
    unsafe fn set_addresses(fib: *mut FibParams, src: &Self, dst: &Self);
    fn next_hop(fib: &FibParams) -> [u32; 4];
    /// One hop less; an error if the packet has none left.
    fn decrement_hops(ctx: &TcContext, proto: u8) -> Result<(), ()>;
}

impl Forward for Ipv4 {
    const AF: u8 = AF_INET;
    #[inline(always)]
    unsafe fn set_addresses(fib: *mut FibParams, src: &Ipv4, dst: &Ipv4) {
        (*fib).__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(*src);
        (*fib).__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*dst);
    }
    #[inline(always)]
    fn next_hop(fib: &FibParams) -> [u32; 4] {
        // SAFETY: a plain integer union field.
        [unsafe { fib.__bindgen_anon_4.ipv4_dst }, 0, 0, 0]
    }
    #[inline(always)]
    fn decrement_hops(ctx: &TcContext, proto: u8) -> Result<(), ()> {
        // TTL and protocol share a 16-bit word of the header checksum.
        let ttl: u8 = ctx.load(IP_TTL_OFF).map_err(|_| ())?;
        if ttl <= 1 {
            return Err(());
        }
        let old = u16::from_be_bytes([ttl, proto]);
        let new = u16::from_be_bytes([ttl - 1, proto]);
        ctx.l3_csum_replace(
            IP_CSUM_OFF as usize,
            u64::from(old.to_be()),
            u64::from(new.to_be()),
            2,
        )
        .map_err(|_| ())?;
        ctx.store(IP_TTL_OFF, &(ttl - 1), 0).map_err(|_| ())
    }
}

impl Forward for Ipv6 {
    const AF: u8 = AF_INET6;
    #[inline(always)]
    unsafe fn set_addresses(fib: *mut FibParams, src: &Ipv6, dst: &Ipv6) {
        // Word by word: a 16-byte copy is a 128-bit move the BPF backend
        // cannot lower (see `Family::same`).
        let word =
            |a: &Ipv6, i: usize| core::ptr::read_unaligned((a.as_ptr() as *const u32).add(i));
        for i in 0..4 {
            (*fib).__bindgen_anon_3.ipv6_src[i] = word(src, i);
            (*fib).__bindgen_anon_4.ipv6_dst[i] = word(dst, i);
        }
    }
    #[inline(always)]
    fn next_hop(fib: &FibParams) -> [u32; 4] {
        // SAFETY: a plain integer union field.
        unsafe { fib.__bindgen_anon_4.ipv6_dst }
    }
    #[inline(always)]
    fn decrement_hops(ctx: &TcContext, _: u8) -> Result<(), ()> {
        let hops: u8 = ctx.load(IP6_HOP_LIMIT_OFF).map_err(|_| ())?;
        if hops <= 1 {
            return Err(());
        }
        ctx.store(IP6_HOP_LIMIT_OFF, &(hops - 1), 0).map_err(|_| ())
    }
}

/// The next hop of the packet as the kernel would forward it from the
/// device it arrived on, its size checked against the way out: `tot_len`
/// (the IP datagram's length) against the route's MTU, or with 0 the whole
/// skb (GSO segments each) against the device's.
#[inline(always)]
pub fn lookup<A: Forward>(
    ctx: &TcContext,
    proto: u8,
    src: &A,
    dst: &A,
    tot_len: u16,
) -> Result<Route, ()> {
    // The parameters live in a per-CPU scratch map, not on the stack: the
    // verifier caps a program's stack at 512 bytes.
    let fib = crate::maps::FIB_SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: the map value is this CPU's, valid for the program run; the
    // helper reads and writes it within its size. Zero is a valid value for
    // every field.
    let (rc, fib) = unsafe {
        core::ptr::write_bytes(fib, 0, 1);
        (*fib).family = A::AF;
        (*fib).l4_protocol = proto;
        (*fib).__bindgen_anon_1.tot_len = tot_len;
        // The device the packet arrived on: the lookup runs as forwarding from it.
        (*fib).ifindex = (*ctx.skb.skb).ifindex;
        A::set_addresses(fib, src, dst);
        let rc = bpf_fib_lookup(
            ctx.skb.skb.cast(),
            fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        );
        (rc, &*fib)
    };
    let mut route = Route {
        way: Way::Mac,
        ifindex: fib.ifindex,
        next_hop: [0; 4],
        mtu: 0,
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&fib.dmac);
            macs[6..].copy_from_slice(&fib.smac);
            ctx.store(0, &macs, 0).map_err(|_| ())?;
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            route.way = Way::Neigh;
            // The lookup left the next hop in the destination field.
            route.next_hop = A::next_hop(fib);
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            route.way = Way::TooBig;
            route.mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
        }
        _ => return Err(()),
    }
    Ok(route)
}

/// Sends the (translated) packet along `route`, one hop less; the verdict
/// is `TC_ACT_REDIRECT`.
#[inline(always)]
pub fn send<A: Forward>(ctx: &TcContext, proto: u8, route: &Route) -> Result<i32, ()> {
    A::decrement_hops(ctx, proto)?;
    // SAFETY (both arms): plain helpers on values owned here.
    let action = match route.way {
        Way::Mac => unsafe { bpf_redirect(route.ifindex, 0) },
        Way::Neigh => {
            let mut neigh = bpf_redir_neigh {
                nh_family: u32::from(A::AF),
                __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                    ipv6_nh: route.next_hop,
                },
            };
            unsafe {
                bpf_redirect_neigh(
                    route.ifindex,
                    &mut neigh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            }
        }
        Way::TooBig => return Err(()),
    };
    Ok(action as i32)
}
