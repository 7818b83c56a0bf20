//! The IPv4 programs hand IPv6 packets to the IPv6 programs by tail call,
//! first thing. The program array is filled by the agent at load and
//! pinned (a prog array is emptied when its last user reference goes, and
//! the datapath must keep serving while the agent restarts). With no
//! program at the index (an agent that never filled it), the IPv4 program
//! goes on and leaves the packet alone. The IPv6 ingress programs enter
//! the new-flow and ICMPv6 error programs the same way.

use aya_ebpf::{btf_maps::ProgramArray, macros::btf_map, programs::TcContext};

/// Indexes into `lb_progs6_v4`: `lb_ingress6`, `lb_ingress_ext6`,
/// `lb_egress6`, and the ICMPv6 error and fragment programs of each hook.
pub const INGRESS: u32 = lb_common::family6::INGRESS;
pub const INGRESS_EXTERNAL: u32 = lb_common::family6::INGRESS_EXTERNAL;
pub const EGRESS: u32 = lb_common::family6::EGRESS;
pub const ICMP_INGRESS: u32 = lb_common::family6::ICMP_INGRESS;
pub const ICMP_INGRESS_EXTERNAL: u32 = lb_common::family6::ICMP_INGRESS_EXTERNAL;
pub const ICMP_EGRESS: u32 = lb_common::family6::ICMP_EGRESS;
pub const FRAG_INGRESS: u32 = lb_common::family6::FRAG_INGRESS;
pub const FRAG_INGRESS_EXTERNAL: u32 = lb_common::family6::FRAG_INGRESS_EXTERNAL;
pub const FRAG_EGRESS: u32 = lb_common::family6::FRAG_EGRESS;

#[btf_map(name = "lb_progs6_v4")]
static PROGRAMS6: ProgramArray<{ lb_common::family6::PROGRAMS as usize }> = ProgramArray::new();

/// Tail-calls the IPv6 program `index` (for a packet `parse` found to be
/// IPv6); returns only if the call failed.
#[inline(always)]
pub fn enter(ctx: &TcContext, index: u32) {
    // SAFETY: a tail call replaces this program; on failure it returns.
    unsafe { PROGRAMS6.tail_call(ctx, index) };
}

/// Tail-calls the IPv6 new-flow program (`lb_new6`, `lb_new_ext6`, and
/// for a first fragment `lb_new_frag6`, `lb_new_frag_ext6`); returns only
/// if the call failed.
#[inline(always)]
pub fn enter_new_flow(ctx: &TcContext, external: bool, fragment: bool) {
    use lb_common::family6::{NEW_FLOW, NEW_FLOW_EXTERNAL, NEW_FRAG, NEW_FRAG_EXTERNAL};
    let index = match (external, fragment) {
        (false, false) => NEW_FLOW,
        (true, false) => NEW_FLOW_EXTERNAL,
        (false, true) => NEW_FRAG,
        (true, true) => NEW_FRAG_EXTERNAL,
    };
    // SAFETY: as in `enter`.
    unsafe { PROGRAMS6.tail_call(ctx, index) };
}

/// Tail-calls `lb_too_big6` for a routed packet too big for the way out,
/// with the way's MTU in scratch (`reject::Answer6::mtu`); returns only if
/// the call failed.
#[inline(always)]
pub fn enter_too_big(ctx: &TcContext, mtu: u16) {
    if let Some(answer) = crate::maps::ANSWER6_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's map value; the program called runs on this CPU.
        unsafe { (*answer).mtu = u32::from(mtu) };
        // SAFETY: as in `enter`.
        unsafe { PROGRAMS6.tail_call(ctx, lb_common::family6::TOO_BIG) };
    }
}
