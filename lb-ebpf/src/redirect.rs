//! Sending a SNATed packet on without the node's input path: its source
//! (forward: the node itself; reply: a frontend on the node) would be a
//! martian there. It is routed here instead, as the kernel would forward
//! it: TTL decremented, next hop and neighbour from the FIB. A known
//! neighbour gets the MACs written here and a plain `bpf_redirect`; an
//! unresolved one is left to `bpf_redirect_neigh` with the next hop.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::parse::{ETH_HLEN, IP_CSUM_OFF};

const AF_INET: u8 = 2;
const IP_TTL_OFF: usize = ETH_HLEN as usize + 8;

/// Routes the (already translated) packet towards `daddr_be`; the verdict
/// is `TC_ACT_REDIRECT` on success.
#[inline(always)]
pub fn forward(ctx: &TcContext, proto: u8, saddr_be: u32, daddr_be: u32) -> Result<i32, ()> {
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
    ctx.store(IP_TTL_OFF, &(ttl - 1), 0).map_err(|_| ())?;

    // SAFETY: a plain-data struct; zero is a valid value for every field.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
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
            0,
        )
    };
    // SAFETY (both arms): plain helpers on values owned here.
    let action = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let macs: [u8; 12] = {
                let mut m = [0u8; 12];
                m[..6].copy_from_slice(&fib.dmac);
                m[6..].copy_from_slice(&fib.smac);
                m
            };
            ctx.store(0, &macs, 0).map_err(|_| ())?;
            unsafe { bpf_redirect(fib.ifindex, 0) }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // The lookup left the next hop (gateway or destination) in ipv4_dst.
            let mut neigh = bpf_redir_neigh {
                nh_family: u32::from(AF_INET),
                __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                    ipv4_nh: unsafe { fib.__bindgen_anon_4.ipv4_dst },
                },
            };
            unsafe {
                bpf_redirect_neigh(
                    fib.ifindex,
                    &mut neigh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            }
        }
        _ => return Err(()),
    };
    Ok(action as i32)
}
