//! Connection tracking: two tables keyed by the 5-tuple (addresses in wire
//! order, ports in host order: see the crate's layout rules).
//!
//! - `lb_ct_v4`, assured flows: a plain hash, nothing evicted behind the
//!   agent's back (its GC frees expired flows; a full table keeps a flow in
//!   the other one).
//! - `lb_ct_new_v4`, flows not yet assured: an LRU, so a flood of flows that
//!   never complete (spoofed SYNs, a pod spraying UDP) evicts its own kind
//!   and never stops new flows from being admitted.
//!
//! Assured is netfilter's sense: TCP once the backend has sent something
//! other than its SYN-ACK or an RST (so the handshake completed on its side:
//! a spoofed client cannot make that happen), UDP once answered and still
//! in use 2 s after it began (so answered one-shot queries, DNS above all,
//! stay cheap). A flow is created in the new table and moves to the assured
//! one, both entries, at the packet that assures it.
//!
//! A flow has two entries, written and retired together. Each value holds
//! the tuple its packets leave with:
//! - forward: `client → frontend` (dir `CT_DIR_FORWARD`) leaves as
//!   `client → backend`, or `node:snat_port → backend` when SNATed;
//! - reply: `backend → client` (or `backend → node:snat_port`) leaves as
//!   `frontend → client`.
//!
//! Each entry holds enough to rebuild the other (`peer_key`, `peer_value`),
//! both carry the same state `flags`, and each has its own expiry, refreshed
//! by packets in its direction. A flow is alive while either entry is
//! unexpired; the agent's GC removes both entries once both have expired.

use crate::{user_pod, Ipv4, Ipv6};

/// Assured flows.
pub const CT_MAP: &str = "lb_ct_v4";
pub const DEFAULT_MAX_CT_ENTRIES: u32 = 262_144;
/// Flows not yet assured (an LRU).
pub const CT_NEW_MAP: &str = "lb_ct_new_v4";
pub const DEFAULT_MAX_CT_NEW_ENTRIES: u32 = 65_536;
/// The IPv6 tables, the same model (`CtKey<Ipv6>`, `CtValue<Ipv6>`).
pub const CT6_MAP: &str = "lb_ct6_v4";
pub const CT6_NEW_MAP: &str = "lb_ct_new6_v4";

/// A UDP flow answered and still in use this long after it began is assured.
pub const CT_UDP_ASSURE_NS: u64 = 2 * SEC;

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// `CtValue::flags`: the flow's state, the same in both entries.
/// The backend has answered (TCP: the handshake completed).
pub const CT_SEEN_REPLY: u8 = 1 << 0;
/// The client sent a FIN.
pub const CT_FIN_FORWARD: u8 = 1 << 1;
/// The backend sent a FIN.
pub const CT_FIN_REPLY: u8 = 1 << 2;
/// Either side sent an RST.
pub const CT_RST: u8 = 1 << 3;
/// The flow is source-NATed to the node (external traffic to a backend on
/// another node): both directions are translated at ingress and redirected.
pub const CT_SNAT: u8 = 1 << 4;
/// The flow is assured: its entries are in the assured table (`CT_MAP`).
pub const CT_ASSURED: u8 = 1 << 5;

/// An entry's expiry is pushed forward at most this often (one map write a
/// second per direction, not one per packet).
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

const SEC: u64 = 1_000_000_000;

/// Per-state lifetimes after the last packet, set by the agent at load time
/// (a global of the eBPF object).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP not yet assured (SYN sent, answered but not confirmed, or a
    /// mid-stream pickup): netfilter's SYN_RECV lifetime, not 6 h, so a
    /// spoofed handshake costs a minute at most.
    pub tcp_opening_ns: u64,
    pub tcp_established_ns: u64,
    /// TCP after an RST or FINs both ways.
    pub tcp_closing_ns: u64,
    pub udp_ns: u64,
    /// A SNATed TCP flow after an RST or FINs both ways: its SNAT port is
    /// held as long as the backend may keep the tuple in TIME_WAIT (60 s
    /// on Linux), so a new flow never lands on a tuple the backend refuses.
    pub tcp_snat_closing_ns: u64,
}

impl CtTimeouts {
    pub const DEFAULT: Self = Self {
        tcp_opening_ns: 60 * SEC,
        tcp_established_ns: 6 * 3600 * SEC,
        tcp_closing_ns: 10 * SEC,
        udp_ns: 60 * SEC,
        tcp_snat_closing_ns: 60 * SEC,
    };

    /// The lifetime of a flow in state `flags`.
    #[inline(always)]
    pub const fn for_state(&self, proto: u8, flags: u8) -> u64 {
        if proto != crate::IPPROTO_TCP {
            self.udp_ns
        } else if is_closing(flags) && flags & CT_SNAT != 0 {
            self.tcp_snat_closing_ns
        } else if is_closing(flags) {
            self.tcp_closing_ns
        } else if flags & CT_ASSURED == 0 {
            self.tcp_opening_ns
        } else {
            self.tcp_established_ns
        }
    }
}

/// An RST, or FINs both ways: the connection is over.
#[inline(always)]
pub const fn is_closing(flags: u8) -> bool {
    flags & CT_RST != 0 || flags & (CT_FIN_FORWARD | CT_FIN_REPLY) == CT_FIN_FORWARD | CT_FIN_REPLY
}

#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey<A = Ipv4> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CtValue<A = Ipv4> {
    /// The packet's source after translation. Forward: the client, or the
    /// node's SNAT address. Reply: the frontend.
    pub src_addr: A,
    /// The packet's destination after translation. Forward: the backend.
    /// Reply: the client.
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub rev_nat_id: u16,
    /// `CT_SEEN_REPLY | CT_FIN_* | CT_RST | CT_SNAT | CT_ASSURED`.
    pub flags: u8,
    pub _pad: u8,
    pub backend_id: u32,
    /// The flow's identity (random), the same in both entries: a peer key
    /// that another flow holds now is told apart by it.
    pub flow_id: u32,
    /// When the flow was created (CLOCK_MONOTONIC_COARSE).
    pub created_ns: u64,
    /// CLOCK_MONOTONIC_COARSE (`bpf_ktime_get_coarse_ns`) time after which this entry is idle.
    pub expires_ns: u64,
}

impl<A: Copy> CtKey<A> {
    #[inline(always)]
    pub const fn new(saddr: A, sport: u16, daddr: A, dport: u16, proto: u8, dir: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            dir,
            _pad: [0; 2],
        }
    }

    /// The key of the flow's other entry: the translated tuple, reversed.
    /// (client → VIP leaves as S → backend, so its reply is backend → S;
    /// backend → S leaves as VIP → client, so its forward is client → VIP.)
    #[inline(always)]
    pub const fn peer_key(&self, value: &CtValue<A>) -> CtKey<A> {
        CtKey::new(
            value.dst_addr,
            value.dst_port,
            value.src_addr,
            value.src_port,
            self.proto,
            if self.dir == CT_DIR_FORWARD {
                CT_DIR_REPLY
            } else {
                CT_DIR_FORWARD
            },
        )
    }

    /// The flow's other entry, rebuilt from this one (same state and
    /// expiry): its packets leave as this entry's tuple, reversed.
    #[inline(always)]
    pub const fn peer_value(&self, value: &CtValue<A>) -> CtValue<A> {
        CtValue {
            src_addr: self.daddr,
            src_port: self.dport,
            dst_addr: self.saddr,
            dst_port: self.sport,
            ..*value
        }
    }
}

impl<A> CtValue<A> {
    /// The translated source and destination addresses, adjacent at the
    /// entry's start as in an IPv6 header (the datapath rewrites both from
    /// here at once).
    pub const ADDRESSES_LEN: usize = 2 * core::mem::size_of::<A>();

    pub const fn is_expired(&self, now_ns: u64) -> bool {
        now_ns >= self.expires_ns
    }

    /// The packet that brings `flags` (the flow's state with the packet's
    /// added) in direction `dir` at `now_ns` assures the flow: for TCP a
    /// backend's packet after its SYN-ACK that is no SYN and no RST; for
    /// UDP any packet once answered and 2 s old.
    #[inline(always)]
    pub const fn assures(&self, proto: u8, dir: u8, flags: u8, syn: bool, now_ns: u64) -> bool {
        if self.flags & CT_ASSURED != 0 || flags & CT_SEEN_REPLY == 0 || is_closing(flags) {
            return false;
        }
        if proto == crate::IPPROTO_TCP {
            dir == CT_DIR_REPLY && self.flags & CT_SEEN_REPLY != 0 && !syn
        } else {
            now_ns >= self.created_ns.saturating_add(CT_UDP_ASSURE_NS)
        }
    }

    /// Both entries belong to one flow.
    #[inline(always)]
    pub const fn same_flow(&self, other: &CtValue<A>) -> bool {
        self.flow_id == other.flow_id
    }
}

const _: () = assert!(core::mem::size_of::<CtKey>() == 16 && core::mem::align_of::<CtKey>() == 4);
const _: () =
    assert!(core::mem::size_of::<CtValue>() == 40 && core::mem::align_of::<CtValue>() == 8);
const _: () = assert!(core::mem::size_of::<CtTimeouts>() == 40);

const _: () = assert!(
    core::mem::offset_of!(CtValue<Ipv6>, src_addr) == 0
        && core::mem::offset_of!(CtValue<Ipv6>, dst_addr) == 16
);
const _: () =
    assert!(core::mem::size_of::<CtKey<Ipv6>>() == 40 && core::mem::align_of::<CtKey<Ipv6>>() == 4);
const _: () = assert!(
    core::mem::size_of::<CtValue<Ipv6>>() == 64 && core::mem::align_of::<CtValue<Ipv6>>() == 8
);

user_pod!(CtKey, CtKey<Ipv6>, CtValue, CtValue<Ipv6>, CtTimeouts);
