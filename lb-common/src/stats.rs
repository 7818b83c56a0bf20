//! Per-reason packet counters: a per-CPU array indexed by `Stat`.

pub const STATS_MAP: &str = "lb_stats_v4";

/// Every decision and drop the datapath makes has its own counter.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Ingress: not IPv4, or not TCP/UDP, or not addressed to a frontend: untouched.
    PassNotService = 0,
    /// New flow to a frontend: backend chosen, conntrack created, DNATed.
    DnatNew = 1,
    /// Packet of a tracked flow DNATed to its recorded backend.
    DnatCtHit = 2,
    /// Egress: reply from a backend rewritten to come from the VIP.
    RevNat = 3,
    /// New flow to a frontend with no backends: answered with ICMP port unreachable.
    RejectNoBackend = 4,
    /// Slot refers to a missing backend (agent mid-update or bug): dropped.
    DropBackendMissing = 5,
    /// Truncated or malformed headers: passed untouched, never rewritten.
    PassMalformed = 6,
    /// A first fragment of a service flow whose translation could not be
    /// recorded for the later fragments (the fragment table's write
    /// failed): dropped.
    DropFragment = 7,
    /// The new flow could not be recorded (out of memory for the table of
    /// new flows, which evicts rather than fills): dropped.
    DropCtFull = 8,
    /// A packet rewrite helper failed: dropped.
    DropRewrite = 9,
    /// Reject reply could not be built: dropped.
    DropReject = 10,
    /// Egress: not a reply of a tracked flow: untouched.
    PassNotReply = 11,
    /// One direction of a live flow was missing and was rebuilt from the other.
    CtRecreated = 12,
    /// New flow also SNATed to the node and redirected (counted besides
    /// `dnat_new`): external traffic to a backend on another node, traffic
    /// from outside the cluster to a cluster IP's, or a pod reaching itself
    /// through its Service (hairpin).
    SnatNew = 13,
    /// Ingress: reply of a SNATed flow translated back and redirected to the client.
    RevSnat = 14,
    /// New flow under a node-local traffic policy with no local endpoint: dropped.
    DropNoLocalBackend = 15,
    /// No free SNAT port for a new flow (or no SNAT address): dropped.
    DropSnatExhausted = 16,
    /// A SNATed packet had no route, or its TTL ran out: dropped.
    DropRedirect = 17,
    /// New flow from outside `loadBalancerSourceRanges`: dropped.
    DropSourceRange = 18,
    /// A SNAT port held by a flow whose entries had both expired (the
    /// agent's GC had not removed them yet) was taken back.
    CtReclaimed = 19,
    /// A socket's connect or send to a frontend pointed at a backend (socket LB).
    SockTranslated = 20,
    /// A socket's connect or send to a frontend without endpoints, or to an
    /// address of the service CIDRs no frontend holds: refused.
    SockRefused = 21,
    /// A socket's peer or sender address shown as the frontend again.
    SockRevNat = 22,
    /// An ICMP error about a translated flow, translated for its receiver
    /// (quoted packet, checksums, outer addresses).
    IcmpTranslated = 23,
    /// A routed (SNATed) packet too big for the way out, DF set: answered
    /// with ICMP fragmentation needed.
    IcmpFragNeeded = 24,
    /// A flow became assured: its entries moved to the assured table.
    CtAssured = 25,
    /// A flow became assured but the assured table was full: it stays in
    /// the table of new flows, translated as before but evictable.
    CtAssuredFull = 26,
    /// A new flow that would be answered with an ICMP error (no endpoints,
    /// fragmentation needed) past this CPU's ICMP rate limit: dropped
    /// unanswered.
    DropIcmpRateLimited = 27,
    /// Another CPU created the same new flow first (two sends on one socket
    /// at once): its entries were adopted, the packet follows them.
    CtCreateRaced = 28,
    /// A socket's connect or send to a frontend left to the tc path: its
    /// reverse entry could not be made (the map full, or the socket holds
    /// another backend in that slot).
    SockUntranslated = 29,
    /// A TCP or UDP packet to an address in the service CIDRs that no
    /// frontend holds: answered with ICMP port unreachable.
    RejectServiceCidr = 30,
    /// A later fragment (no ports) of a datagram whose first fragment was
    /// translated: rewritten as it was (see `frag`).
    FragTranslated = 31,
    /// A later fragment of no recorded datagram (not a service flow's, or
    /// ahead of its first fragment): untouched.
    PassFragmentUntracked = 32,
    /// An IPv6 packet mid-way (a new flow, a first fragment's record, a
    /// routed packet too big) whose next IPv6 program is not in the program
    /// array (an agent that failed to fill it): dropped.
    DropTailCall = 33,
}

pub const STAT_COUNT: u32 = 34;

pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "pass_not_service",
    "dnat_new",
    "dnat_ct_hit",
    "rev_nat",
    "reject_no_backend",
    "drop_backend_missing",
    "pass_malformed",
    "drop_fragment",
    "drop_ct_full",
    "drop_rewrite",
    "drop_reject",
    "pass_not_reply",
    "ct_recreated",
    "snat_new",
    "rev_snat",
    "drop_no_local_backend",
    "drop_snat_exhausted",
    "drop_redirect",
    "drop_source_range",
    "ct_reclaimed",
    "sock_translated",
    "sock_refused",
    "sock_rev_nat",
    "icmp_translated",
    "icmp_frag_needed",
    "ct_assured",
    "ct_assured_full",
    "drop_icmp_rate_limited",
    "ct_create_raced",
    "sock_untranslated",
    "reject_service_cidr",
    "frag_translated",
    "pass_fragment_untracked",
    "drop_tail_call",
];
