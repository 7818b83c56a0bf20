//! The IPv6 programs' program array (`lb_progs6_v4`): the IPv4 programs
//! tail-call into it for IPv6 packets, the IPv6 ingress programs for a new
//! flow's first packet, a routed packet too big for the way out or an
//! ICMPv6 error. The
//! agent fills it at load. Room is left for programs to come: a pinned
//! array of another size is replaced at load (it holds no state).

pub const PROGRAMS6_MAP: &str = "lb_progs6_v4";
pub const INGRESS: u32 = 0;
pub const INGRESS_EXTERNAL: u32 = 1;
pub const EGRESS: u32 = 2;
pub const NEW_FLOW: u32 = 3;
pub const NEW_FLOW_EXTERNAL: u32 = 4;
pub const TOO_BIG: u32 = 5;
pub const ICMP_INGRESS: u32 = 6;
pub const ICMP_INGRESS_EXTERNAL: u32 = 7;
pub const ICMP_EGRESS: u32 = 8;
/// The array's size: the programs and room for more.
pub const PROGRAMS: u32 = 16;

/// The programs at each index, in order.
pub const PROGRAM_NAMES: [&str; 9] = [
    "lb_ingress6",
    "lb_ingress_ext6",
    "lb_egress6",
    "lb_new6",
    "lb_new_ext6",
    "lb_too_big6",
    "lb_icmp6_in",
    "lb_icmp6_in_ext",
    "lb_icmp6_out",
];
