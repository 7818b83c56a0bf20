//! Sending a SNATed packet on without the node's input path: its source
//! (forward: the node itself; reply: a frontend on the node) would be a
//! martian there. It is routed here instead, as the kernel would forward
//! it: TTL decremented, next hop from the FIB, neighbour resolved by
//! `bpf_redirect_neigh`. The FIB lookup finds the output device.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH},
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::parse::{Packet, ETH_HLEN, IP_CSUM_OFF};

const AF_INET: u8 = 2;
const IP_TTL_OFF: usize = ETH_HLEN as usize + 8;

/// Routes the (already translated) packet towards `daddr_be`; the verdict
/// is `TC_ACT_REDIRECT` on success.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Packet, saddr_be: u32, daddr_be: u32) -> Result<i32, ()> {
    // TTL and protocol share a 16-bit word of the header checksum.
    let ttl: u8 = ctx.load(IP_TTL_OFF).map_err(|_| ())?;
    if ttl <= 1 {
        return Err(());
    }
    let old = u16::from_be_bytes([ttl, pkt.proto]);
    let new = u16::from_be_bytes([ttl - 1, pkt.proto]);
    ctx.l3_csum_replace(
        IP_CSUM_OFF as usize,
        u64::from(old.to_be()),
        u64::from(new.to_be()),
        2,
    )
    .map_err(|_| ())?;
    ctx.store(IP_TTL_OFF, &(ttl - 1), 0).map_err(|_| ())?;

    // SAFETY: a plain-data struct; zero is a valid value for every field.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = pkt.proto;
    // The device the packet arrived on: the lookup runs as forwarding from it.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = saddr_be;
    fib.__bindgen_anon_4.ipv4_dst = daddr_be;
    // SAFETY: the helper reads and writes `fib` only, within its size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return Err(());
    }
    // No next hop given: the helper routes the packet on that device itself
    // (gateway or on-link) and resolves the neighbour, queueing if needed.
    // SAFETY: a null parameter block with length 0 is the documented form.
    let action = unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) };
    Ok(action as i32)
}
