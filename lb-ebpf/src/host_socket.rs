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
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

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
    let size = core::mem::size_of::<u32>() as u32 * 3;
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: ctx is the program's context; the tuple lives on this stack
    // for the call; a socket found is released before returning.
    unsafe {
        let sk = match proto {
            IPPROTO_TCP => bpf_skc_lookup_tcp(ctx, &mut tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx, &mut tuple, size, netns, 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
        true
    }
}
