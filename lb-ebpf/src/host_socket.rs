//! Whether a socket of the node itself would take a packet: a SNAT port
//! must not be one, or the flow's answers (backend → node:port) would be
//! taken for the node's own traffic, and the node's for the flow's. The
//! SNAT range (1024–29999 by default) holds well-known node ports — the
//! API server's 6443, the kubelet's 10250, kube-proxy's health 10256, node
//! exporter's 9100 — and any port a node process binds, so the kernel's
//! own socket tables are asked rather than a list.

use aya_ebpf::{
    bindings::{bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, BPF_F_CURRENT_NETNS},
    cty::c_void,
    helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
};
use lb_common::{Ipv6, IPPROTO_TCP, IPPROTO_UDP};

use crate::maps::SOCK_TUPLE_SCRATCH;

/// Whether a TCP (listening, established, time-wait or request) or UDP
/// socket in the packet's network namespace would receive `proto` from
/// `saddr:sport` to `daddr:dport` (addresses as their bytes read native,
/// `ports` = `sport << 16 | dport`, host order). A BPF function of its own,
/// taking scalars (five at most): inlined in each of the unrolled SNAT port
/// tries, the lookup and its reference's release were walked once per try.
/// Even so each try walks it again: it costs the external program 114 k of
/// its verified instructions (moving the tries into `bpf_loop`, verified
/// once, is the way to win them back).
#[inline(never)]
pub fn receives(ctx: *mut c_void, proto: u8, saddr: u32, daddr: u32, ports: u32) -> bool {
    // SAFETY: a zeroed plain C union is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
        saddr,
        daddr,
        sport: ((ports >> 16) as u16).to_be(),
        dport: (ports as u16).to_be(),
    };
    lookup(
        ctx,
        proto,
        &mut tuple,
        core::mem::size_of::<u32>() as u32 * 3,
    )
}

/// `receives` for IPv6: the addresses by reference (as scalars they would
/// be eight), the tuple in per-CPU scratch (`maps::SOCK_TUPLE_SCRATCH`):
/// the new-flow program's stack and this function's together must stay
/// within 512 bytes.
#[inline(never)]
pub fn receives6(ctx: *mut c_void, proto: u8, saddr: &Ipv6, daddr: &Ipv6, ports: u32) -> bool {
    let Some(tuple) = SOCK_TUPLE_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let word = |a: &Ipv6, i: usize| {
        // SAFETY: i < 4: inside the array; unaligned reads.
        unsafe { core::ptr::read_unaligned((a.as_ptr() as *const u32).add(i)) }
    };
    // SAFETY: this CPU's map value, valid for the program run, written
    // field by field (no 16-byte copies, see `Family::same`).
    let tuple = unsafe {
        let v6 = &mut (*tuple).__bindgen_anon_1.ipv6;
        for i in 0..4 {
            v6.saddr[i] = word(saddr, i);
            v6.daddr[i] = word(daddr, i);
        }
        v6.sport = ((ports >> 16) as u16).to_be();
        v6.dport = (ports as u16).to_be();
        &mut *tuple
    };
    lookup(ctx, proto, tuple, core::mem::size_of::<u32>() as u32 * 9)
}

/// The socket lookup on a tuple of `size` bytes (its family's part), on
/// the stack or in a map.
#[inline(always)]
fn lookup(ctx: *mut c_void, proto: u8, tuple: &mut bpf_sock_tuple, size: u32) -> bool {
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: ctx is the program's context; the tuple lives on the caller's
    // stack for the call; a socket found is released before returning.
    unsafe {
        let sk = match proto {
            IPPROTO_TCP => bpf_skc_lookup_tcp(ctx, tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx, tuple, size, netns, 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
        true
    }
}
