//! The IPv6 programs' program array (`lb_progs6_v4`): the IPv4 programs
//! tail-call into it for IPv6 packets, the IPv6 ingress programs for a new
//! flow's first packet, a routed packet too big for the way out, an
//! ICMPv6 error or a fragment. The agent fills it at load. Room is left for programs to come: a pinned
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
pub const FRAG_INGRESS: u32 = 9;
pub const FRAG_INGRESS_EXTERNAL: u32 = 10;
pub const FRAG_EGRESS: u32 = 11;
pub const NEW_FRAG: u32 = 12;
pub const NEW_FRAG_EXTERNAL: u32 = 13;
pub const FRAG_RECORD: u32 = 14;
pub const FRAG_FOLLOW: u32 = 15;
/// The array's size: the programs and room for more.
pub const PROGRAMS: u32 = 24;

/// The programs at each index, in order.
pub const PROGRAM_NAMES: [&str; 16] = [
    "lb_ingress6",
    "lb_ingress_ext6",
    "lb_egress6",
    "lb_new6",
    "lb_new_ext6",
    "lb_too_big6",
    "lb_icmp6_in",
    "lb_icmp6_in_ext",
    "lb_icmp6_out",
    "lb_frag6_in",
    "lb_frag6_in_ext",
    "lb_frag6_out",
    "lb_new_frag6",
    "lb_new_frag_ext6",
    "lb_frag6_record",
    "lb_frag6_follow",
];
