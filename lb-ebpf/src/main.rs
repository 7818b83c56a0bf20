//! tc service load balancer. Ingress (`lb_ingress`, `lb_ingress_external`
//! on uplinks): DNAT a client's packet to a backend and track the flow;
//! external traffic to another node's backend is also SNATed to the node. Egress (`lb_egress`): reverse-NAT the
//! backend's reply on its way out to the client. Between the two hooks the
//! node's own stack (routing, netfilter) sees the flow as client ↔ backend
//! in both directions, consistently. IPv6 packets go on, by tail call, to
//! the IPv6 programs (`lb_ingress6`, `lb_ingress_ext6`, `lb_egress6`; a new
//! flow's first packet to `lb_new6`, `lb_new_ext6`): the same service path,
//! generic over the family (`family::Family`, `Edges`). See
//! docs/datapath.md "Packet path" and "IPv6".
#![no_std]
#![no_main]

mod affinity;
mod cidrs;
mod csum;
mod ct;
mod family;
mod family6;
mod frag;
mod host_socket;
mod icmp;
mod maglev;
mod maps;
mod nat;
mod parse;
mod redirect;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{tcx_action_base::TCX_NEXT, TC_ACT_SHOT},
    btf_maps::lpm_trie::Key,
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    affinity::AffinityKey,
    ct::{CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_SNAT},
    hash::{flow_hash, select_slot},
    source_range::{SourceRangeKey, SOURCE_RANGE_ID_BITS},
    stats::Stat,
    svc::{
        SvcValue, SVC_FLAGS_EXTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL_LOCAL,
        SVC_FLAG_INTERNAL_LOCAL, SVC_FLAG_MAGLEV, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
    },
    Ipv4, Ipv6,
};

use crate::{
    family::Family,
    icmp::QuotingError,
    parse::{Packet, Parsed, Parsed6},
    stats::count,
};

/// Verdict plus the counter that explains it.
#[derive(Clone, Copy)]
pub struct Outcome {
    pub action: i32,
    pub stat: Stat,
}

impl Outcome {
    /// Continue with the next program or tc filter on the hook (TCX_NEXT,
    /// i.e. TC_ACT_UNSPEC), then the stack. Used for packets we leave alone
    /// and for those we translated: a CNI's or a shaper's programs still see
    /// every packet, translated ones as client ↔ backend.
    const fn next(stat: Stat) -> Self {
        Self {
            action: TCX_NEXT,
            stat,
        }
    }
    const fn drop(stat: Stat) -> Self {
        Self {
            action: TC_ACT_SHOT as i32,
            stat,
        }
    }
}

/// Ingress on pod-facing (internal) interfaces.
#[classifier]
pub fn lb_ingress(ctx: TcContext) -> i32 {
    finish(&ctx, ingress::<false>(&ctx))
}

/// A debug event for a new flow. Compiled in, pruned by the verifier unless
/// the agent loads the program with --datapath-log (AYA_LOG_LEVEL is
/// read-only).
#[inline(always)]
fn log_new_flow(ctx: &TcContext, pkt: &Packet, entry: &CtValue) {
    debug!(
        ctx,
        "new flow {:i}:{} -> {:i}:{} -> backend {:i}:{}",
        u32::from_be(pkt.saddr_be()),
        u16::from_be(pkt.sport_be),
        u32::from_be(pkt.daddr_be()),
        u16::from_be(pkt.dport_be),
        u32::from_be_bytes(entry.dst_addr),
        entry.dst_port
    );
}

/// Two events: one with all three IPv6 addresses took a frame that, on
/// top of the new-flow programs', passed the 512-byte stack.
#[inline(always)]
fn log_new_flow6(ctx: &TcContext, pkt: &Packet<Ipv6>, entry: &CtValue<Ipv6>) {
    debug!(
        ctx,
        "new flow [{:i}]:{} -> [{:i}]:{}",
        pkt.saddr,
        u16::from_be(pkt.sport_be),
        pkt.daddr,
        u16::from_be(pkt.dport_be)
    );
    debug!(
        ctx,
        "new flow to [{:i}]:{} -> backend [{:i}]:{}",
        pkt.daddr,
        u16::from_be(pkt.dport_be),
        entry.dst_addr,
        entry.dst_port
    );
}

/// A debug event for a dropped packet, with the counter it moved (the
/// index in `lb-agent inspect stats` order).
#[inline(always)]
fn log_drop(ctx: &TcContext, outcome: &Outcome) {
    if outcome.action == TC_ACT_SHOT as i32 {
        debug!(ctx, "dropped: counter {}", outcome.stat as u32);
    }
}

/// Ingress on the node's uplinks (`--external-interfaces`): traffic from
/// outside the cluster, subject to `externalTrafficPolicy`, and the replies
/// of SNATed flows.
#[classifier]
pub fn lb_ingress_external(ctx: TcContext) -> i32 {
    finish(&ctx, ingress::<true>(&ctx))
}

#[classifier]
pub fn lb_egress(ctx: TcContext) -> i32 {
    let outcome = egress(&ctx);
    count(outcome.stat);
    outcome.action
}

/// The IPv6 programs, entered from the ones above by tail call
/// (`family6`): a program of its own per family keeps each within the
/// verifier's 512-byte stack and its instruction budget.
#[classifier]
pub fn lb_ingress6(ctx: TcContext) -> i32 {
    finish(&ctx, ingress6::<false, false>(&ctx))
}

#[classifier]
pub fn lb_ingress_ext6(ctx: TcContext) -> i32 {
    finish(&ctx, ingress6::<true, false>(&ctx))
}

#[classifier]
pub fn lb_egress6(ctx: TcContext) -> i32 {
    finish(&ctx, egress6::<false>(&ctx))
}

/// A new IPv6 flow's first packet (see `Edges::first_packet` for `Ipv6`):
/// parsed and its frontend looked up again.
#[classifier]
pub fn lb_new6(ctx: TcContext) -> i32 {
    finish(&ctx, new_flow6::<false, false>(&ctx))
}

#[classifier]
pub fn lb_new_ext6(ctx: TcContext) -> i32 {
    finish(&ctx, new_flow6::<true, false>(&ctx))
}

/// IPv6 fragments (`Parsed6::Fragmented`): the same paths, for a first
/// fragment (recorded for its datagram) or a later one (following it).
#[classifier]
pub fn lb_frag6_in(ctx: TcContext) -> i32 {
    finish(&ctx, ingress6::<false, true>(&ctx))
}

#[classifier]
pub fn lb_frag6_in_ext(ctx: TcContext) -> i32 {
    finish(&ctx, ingress6::<true, true>(&ctx))
}

#[classifier]
pub fn lb_frag6_out(ctx: TcContext) -> i32 {
    finish(&ctx, egress6::<true>(&ctx))
}

#[classifier]
pub fn lb_new_frag6(ctx: TcContext) -> i32 {
    finish(&ctx, new_flow6::<false, true>(&ctx))
}

#[classifier]
pub fn lb_new_frag_ext6(ctx: TcContext) -> i32 {
    finish(&ctx, new_flow6::<true, true>(&ctx))
}

/// A first IPv6 fragment's record, a later one's translation (see
/// `frag::Fragments` for `Ipv6`).
#[classifier]
pub fn lb_frag6_record(ctx: TcContext) -> i32 {
    finish(&ctx, frag::finish_record::<Ipv6>(&ctx))
}

#[classifier]
pub fn lb_frag6_follow(ctx: TcContext) -> i32 {
    finish(&ctx, frag::follow_keyed::<Ipv6>(&ctx))
}

/// A routed IPv6 packet too big for the way out (`Edges::too_big`),
/// answered with packet too big.
#[classifier]
pub fn lb_too_big6(ctx: TcContext) -> i32 {
    // A first fragment's too (`lb_frag6_in`).
    let parsed = match parse::parse6::<false>(&ctx) {
        Parsed6::Fragmented => parse::parse6::<true>(&ctx),
        parsed => parsed,
    };
    let outcome = match parsed {
        Parsed6::Packet(pkt) => match maps::ANSWER6_SCRATCH.get_ptr(0) {
            // SAFETY: this CPU's map value, written by the caller.
            Some(answer) => {
                let mtu = unsafe { (*answer).mtu };
                reject::packet_too_big6(&ctx, &pkt, mtu as u16)
            }
            None => Outcome::drop(Stat::DropRedirect),
        },
        _ => Outcome::drop(Stat::DropRedirect),
    };
    finish(&ctx, outcome)
}

/// A program's verdict, counted (and logged when a drop).
#[inline(always)]
fn finish(ctx: &TcContext, outcome: Outcome) -> i32 {
    count(outcome.stat);
    log_drop(ctx, &outcome);
    outcome.action
}

#[inline(always)]
fn ingress6<const EXTERNAL: bool, const FRAGMENTS: bool>(ctx: &TcContext) -> Outcome {
    match parse::parse6::<FRAGMENTS>(ctx) {
        Parsed6::Packet(pkt) => {
            frag::recorded::<Ipv6, false>(ctx, &pkt, to_frontend::<Ipv6, EXTERNAL>(ctx, &pkt))
        }
        Parsed6::IcmpError => {
            let index = if EXTERNAL {
                family6::ICMP_INGRESS_EXTERNAL
            } else {
                family6::ICMP_INGRESS
            };
            family6::enter(ctx, index);
            Outcome::next(Stat::PassNotService) // no program there
        }
        Parsed6::Fragmented => {
            let index = if EXTERNAL {
                family6::FRAG_INGRESS_EXTERNAL
            } else {
                family6::FRAG_INGRESS
            };
            family6::enter(ctx, index);
            Outcome::next(Stat::PassFragmentUntracked) // no program there
        }
        Parsed6::Fragment => frag::follow_stashed::<Ipv6, false>(ctx),
        Parsed6::NotForUs => Outcome::next(Stat::PassNotService),
        Parsed6::Malformed => Outcome::next(Stat::PassMalformed),
    }
}

/// An ICMPv6 error at ingress (`Parsed6::IcmpError`), translated if it
/// quotes a flow of ours.
#[classifier]
pub fn lb_icmp6_in(ctx: TcContext) -> i32 {
    finish(&ctx, icmp6_error::<false, false>(&ctx))
}

#[classifier]
pub fn lb_icmp6_in_ext(ctx: TcContext) -> i32 {
    finish(&ctx, icmp6_error::<false, true>(&ctx))
}

#[classifier]
pub fn lb_icmp6_out(ctx: TcContext) -> i32 {
    finish(&ctx, icmp6_error::<true, false>(&ctx))
}

#[inline(always)]
fn icmp6_error<const EGRESS: bool, const EXTERNAL: bool>(ctx: &TcContext) -> Outcome {
    let pass = if EGRESS {
        Stat::PassNotReply
    } else {
        Stat::PassNotService
    };
    match parse::parse_icmp6_error(ctx) {
        Ok(Some(err)) if EGRESS => icmp_error_egress::<Ipv6, _>(ctx, &err),
        Ok(Some(err)) => icmp_error_ingress::<Ipv6, _, EXTERNAL>(ctx, &err),
        Ok(None) => Outcome::next(pass),
        Err(()) => Outcome::next(Stat::PassMalformed),
    }
}

#[inline(always)]
fn new_flow6<const EXTERNAL: bool, const FRAGMENTS: bool>(ctx: &TcContext) -> Outcome {
    let Parsed6::Packet(pkt) = parse::parse6::<FRAGMENTS>(ctx) else {
        return Outcome::next(Stat::PassMalformed);
    };
    // SAFETY: copied at once, as in `to_frontend`.
    match maps::SERVICES6
        .get_ptr(&pkt.svc_key(0))
        .map(|s| unsafe { *s })
    {
        Some(svc) => {
            let outcome = new_flow::<Ipv6, EXTERNAL>(ctx, &pkt, &svc, ct::now());
            frag::recorded::<Ipv6, false>(ctx, &pkt, outcome)
        }
        None => Outcome::next(Stat::PassNotService), // removed meanwhile
    }
}

#[inline(always)]
fn egress6<const FRAGMENTS: bool>(ctx: &TcContext) -> Outcome {
    match parse::parse6::<FRAGMENTS>(ctx) {
        Parsed6::Packet(pkt) => frag::recorded::<Ipv6, true>(ctx, &pkt, reply::<Ipv6>(ctx, &pkt)),
        Parsed6::IcmpError => {
            family6::enter(ctx, family6::ICMP_EGRESS);
            Outcome::next(Stat::PassNotReply) // no program there
        }
        Parsed6::Fragmented => {
            family6::enter(ctx, family6::FRAG_EGRESS);
            Outcome::next(Stat::PassFragmentUntracked) // no program there
        }
        Parsed6::Fragment => frag::follow_stashed::<Ipv6, true>(ctx),
        Parsed6::NotForUs => Outcome::next(Stat::PassNotReply),
        Parsed6::Malformed => Outcome::next(Stat::PassMalformed),
    }
}

#[inline(always)]
fn ingress<const EXTERNAL: bool>(ctx: &TcContext) -> Outcome {
    match parse::parse(ctx) {
        Parsed::Packet(pkt) => {
            frag::recorded::<Ipv4, false>(ctx, &pkt, to_frontend::<Ipv4, EXTERNAL>(ctx, &pkt))
        }
        Parsed::Ipv6 => {
            let index = if EXTERNAL {
                family6::INGRESS_EXTERNAL
            } else {
                family6::INGRESS
            };
            family6::enter(ctx, index);
            Outcome::next(Stat::PassNotService) // no IPv6 program there
        }
        Parsed::IcmpError(err) => icmp_error_ingress::<Ipv4, _, EXTERNAL>(ctx, &err),
        Parsed::Fragment(frag) => frag::follow::<Ipv4, false>(ctx, &frag),
        Parsed::NotForUs => Outcome::next(Stat::PassNotService),
        Parsed::Malformed => Outcome::next(Stat::PassMalformed),
    }
}

/// Where the families differ on the service path: ICMP and ICMPv6, where
/// the new-flow path runs.
trait Edges: nat::Rewrite + frag::Fragments {
    /// ICMP's protocol number in this family (`IPPROTO_ICMP`, `…ICMPV6`).
    const ICMP: u8;
    /// A packet addressed to no frontend.
    fn not_a_frontend(ctx: &TcContext, pkt: &Packet<Self>) -> Outcome;
    /// A new flow to a frontend with no backends.
    fn no_backends(ctx: &TcContext, pkt: &Packet<Self>) -> Outcome;
    /// A routed (SNATed) packet too big for the way out (`mtu`).
    fn too_big(ctx: &TcContext, pkt: &Packet<Self>, mtu: u16) -> Outcome;
    fn log_new_flow(ctx: &TcContext, pkt: &Packet<Self>, entry: &CtValue<Self>);
    /// A new flow's first packet to `svc` (`new_flow`, here or in a
    /// program of its own).
    fn first_packet<const EXTERNAL: bool>(
        ctx: &TcContext,
        pkt: &Packet<Self>,
        svc: &SvcValue,
        now: u64,
    ) -> Outcome;
}

impl Edges for Ipv4 {
    const ICMP: u8 = lb_common::IPPROTO_ICMP;
    #[inline(always)]
    fn not_a_frontend(ctx: &TcContext, pkt: &Packet) -> Outcome {
        if pkt.daddr.in_service_cidrs() {
            return reject::service_cidr(ctx, pkt);
        }
        Outcome::next(Stat::PassNotService)
    }
    #[inline(always)]
    fn no_backends(ctx: &TcContext, pkt: &Packet) -> Outcome {
        reject::port_unreachable(ctx, pkt)
    }
    #[inline(always)]
    fn too_big(ctx: &TcContext, pkt: &Packet, mtu: u16) -> Outcome {
        if pkt.dont_fragment {
            reject::frag_needed(ctx, pkt, mtu)
        } else {
            Outcome::drop(Stat::DropRedirect) // fragmenting is not done here
        }
    }
    #[inline(always)]
    fn log_new_flow(ctx: &TcContext, pkt: &Packet, entry: &CtValue) {
        log_new_flow(ctx, pkt, entry)
    }
    #[inline(always)]
    fn first_packet<const EXTERNAL: bool>(
        ctx: &TcContext,
        pkt: &Packet,
        svc: &SvcValue,
        now: u64,
    ) -> Outcome {
        new_flow::<Ipv4, EXTERNAL>(ctx, pkt, svc, now)
    }
}

impl Edges for Ipv6 {
    const ICMP: u8 = lb_common::IPPROTO_ICMPV6;
    #[inline(always)]
    fn not_a_frontend(ctx: &TcContext, pkt: &Packet<Ipv6>) -> Outcome {
        if pkt.daddr.in_service_cidrs() {
            return reject::service_cidr6(ctx, pkt);
        }
        Outcome::next(Stat::PassNotService)
    }
    #[inline(always)]
    fn no_backends(ctx: &TcContext, pkt: &Packet<Ipv6>) -> Outcome {
        reject::port_unreachable6(ctx, pkt)
    }
    /// IPv6 routers never fragment: always packet too big, built in a
    /// program of its own (`lb_too_big6`): inlined at each routed send it
    /// took the ingress programs past the verifier's million instructions.
    #[inline(always)]
    fn too_big(ctx: &TcContext, _: &Packet<Ipv6>, mtu: u16) -> Outcome {
        family6::enter_too_big(ctx, mtu);
        Outcome::drop(Stat::DropTailCall)
    }
    #[inline(always)]
    fn log_new_flow(ctx: &TcContext, pkt: &Packet<Ipv6>, entry: &CtValue<Ipv6>) {
        log_new_flow6(ctx, pkt, entry)
    }
    /// In a program of its own (`lb_new6`, `lb_new_ext6`), entered by tail
    /// call: with the tracked path's in one, IPv6's 40-byte keys and
    /// 64-byte entries do not fit the 512-byte stack.
    #[inline(always)]
    fn first_packet<const EXTERNAL: bool>(
        ctx: &TcContext,
        pkt: &Packet<Ipv6>,
        _: &SvcValue,
        _: u64,
    ) -> Outcome {
        family6::enter_new_flow(ctx, EXTERNAL, pkt.is_fragment);
        Outcome::drop(Stat::DropTailCall)
    }
}

/// A TCP or UDP packet at ingress: to a frontend (DNAT, tracked), the
/// answer of a SNATed flow, or neither.
#[inline(always)]
fn to_frontend<A: Edges, const EXTERNAL: bool>(ctx: &TcContext, pkt: &Packet<A>) -> Outcome {
    let frontend = pkt.svc_key(0);
    // SAFETY: copied at once; the agent may rewrite slot 0 at any time.
    let svc = A::services().get_ptr(&frontend).map(|s| unsafe { *s });
    // The answer of a SNATed flow goes to the node address: not a frontend,
    // or a node port in a range overlapping the SNAT range (the answer
    // wins). Cluster and LB IPs skip the check. It arrives at an uplink, or
    // from a pod that reached its own Service (hairpin).
    if svc.is_none_or(|s| s.flags & SVC_FLAG_NODE_PORT != 0) {
        if let Some(outcome) = reverse_snat(ctx, pkt) {
            return outcome;
        }
    }
    let Some(svc) = svc else {
        return A::not_a_frontend(ctx, pkt);
    };
    let forward_key = pkt.ct_key(CT_DIR_FORWARD);
    let mut entry = CtValue::default();
    let now = match ct::lookup(&forward_key, &mut entry) {
        Some((now, true)) if !ct::is_reopened(&entry, pkt) => {
            ct::update(&forward_key, &entry, pkt, now);
            return send::<A, false>(ctx, pkt, &entry, Stat::DnatCtHit);
        }
        // Over (timed out both ways, or reopened by a SYN) though not yet
        // collected: retired, so its entries shadow neither of the new flow's.
        Some((now, _)) => {
            ct::retire(&forward_key, &entry);
            now
        }
        None => ct::now(),
    };
    A::first_packet::<EXTERNAL>(ctx, pkt, &svc, now)
}

/// Whether a new flow to `backend` is SNATed to the node, so that its
/// answer comes back through this node to be reverse-NATed:
/// - external traffic to another node's backend (its node would answer the
///   client directly, from the backend's address);
/// - at an uplink, traffic from outside the cluster to a cluster IP whose
///   backend is on another node (a service CIDR routed into the cluster),
///   for the same reason, as kube-proxy masquerades it;
/// - a pod whose flow lands on itself (hairpin): it would drop a packet
///   from its own address, and answer itself.
#[inline(always)]
fn snat_needed<A: Family, const EXTERNAL: bool>(
    pkt: &Packet<A>,
    external: bool,
    remote: bool,
    backend_addr: &A,
) -> bool {
    if backend_addr.same(&pkt.saddr) {
        return true;
    }
    remote && (external || (EXTERNAL && !pkt.saddr.in_cluster_cidrs()))
}

/// A new flow to frontend `svc`: admitted, a backend picked, tracked,
/// translated. Traffic from outside to an external frontend follows
/// externalTrafficPolicy; everything else to a cluster IP follows
/// internalTrafficPolicy. Local slots come first (1..=local_count).
#[inline(always)]
fn new_flow<A: Edges, const EXTERNAL: bool>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    svc: &SvcValue,
    now: u64,
) -> Outcome {
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 && !source_allowed(&pkt.saddr, svc.rev_nat_id) {
        return Outcome::drop(Stat::DropSourceRange);
    }
    if svc.count == 0 {
        return A::no_backends(ctx, pkt);
    }
    let external = EXTERNAL && svc.flags & SVC_FLAGS_EXTERNAL != 0;
    let local_only = if external {
        svc.flags & SVC_FLAG_EXTERNAL_LOCAL != 0
    } else {
        svc.flags & SVC_FLAG_INTERNAL_LOCAL != 0
    };
    let choices = if local_only {
        svc.local_count
    } else {
        svc.count
    };
    if choices == 0 {
        return Outcome::drop(Stat::DropNoLocalBackend);
    }
    let hash = flow_hash(
        pkt.saddr.fold(),
        pkt.daddr.fold(),
        pkt.sport_be,
        pkt.dport_be,
        pkt.proto,
    );
    let affinity_key = if svc.flags & SVC_FLAG_AFFINITY != 0 {
        Some(AffinityKey::new(pkt.saddr, svc.rev_nat_id))
    } else {
        None
    };
    let remembered = affinity_key
        .as_ref()
        .and_then(|key| affinity::remembered(key, svc, local_only, now));
    let Some((backend_id, remote)) =
        remembered.or_else(|| pick(pkt, svc, hash, choices, local_only))
    else {
        return Outcome::drop(Stat::DropBackendMissing);
    };
    let Some(backend) = A::backends().get_ptr(&backend_id) else {
        return Outcome::drop(Stat::DropBackendMissing);
    };
    let backend = unsafe { *backend };
    if let Some(key) = &affinity_key {
        affinity::remember(key, backend_id, now);
    }
    let mut entry = ct::new_forward(pkt, &backend, backend_id, svc.rev_nat_id, now);
    let created = if snat_needed::<A, EXTERNAL>(pkt, external, remote, &backend.addr) {
        match A::config() {
            Some(config) => ct::create_snat(ctx, pkt, &mut entry, config, now),
            None => Err(Stat::DropSnatExhausted),
        }
    } else {
        ct::create(pkt, &entry, 0).map_err(|_| Stat::DropCtFull)
    };
    match created {
        Ok(ct::Created::New) if entry.flags & CT_SNAT != 0 => count(Stat::SnatNew),
        Ok(ct::Created::New) => {}
        Ok(ct::Created::Raced) => ct::adopt(pkt, &mut entry),
        Err(stat) => return Outcome::drop(stat),
    }
    A::log_new_flow(ctx, pkt, &entry);
    send::<A, false>(ctx, pkt, &entry, Stat::DnatNew)
}

/// A backend for a new flow with no remembered one: by the frontend's
/// Maglev table, or a slot by flow hash among the first `choices` (so a
/// lost conntrack entry still maps a flow to the same backend while the
/// backend set is unchanged). The id, and whether it runs on another node.
#[inline(always)]
fn pick<A: Family>(
    pkt: &Packet<A>,
    svc: &SvcValue,
    hash: u32,
    choices: u16,
    local_only: bool,
) -> Option<(u32, bool)> {
    if svc.flags & SVC_FLAG_MAGLEV != 0 && !local_only {
        return maglev::pick(svc, hash);
    }
    let slot = select_slot(hash, choices);
    // SAFETY: a map value pointer, copied at once.
    let value = unsafe { *A::services().get_ptr(&pkt.svc_key(slot))? };
    Some((
        value.backend_id,
        value.slot_is_remote(slot, svc.local_count),
    ))
}

/// The error rewritten in the terms of the flow it quotes (`entry`); it
/// goes on where it was headed.
#[inline(always)]
fn translated<A, E: QuotingError<A>>(ctx: &TcContext, err: &E, entry: &CtValue<A>) -> Outcome {
    if err.translate(ctx, entry).is_err() {
        return Outcome::drop(Stat::DropRewrite);
    }
    Outcome::next(Stat::IcmpTranslated)
}

/// The live flow an error quotes, read into this CPU's scratch entry (no
/// packet being translated uses it: an IPv6 entry on the stack took the
/// ICMPv6 programs past 512 bytes): the quoted packet reversed is its
/// `dir` tuple, and it is SNATed or not as `snat` says (`None`: either).
#[inline(always)]
fn quoted_flow<A: Family, E: QuotingError<A>>(
    err: &E,
    dir: u8,
    snat: Option<bool>,
) -> Option<&'static CtValue<A>> {
    let (scratch, _) = A::ct_scratch()?;
    // SAFETY: this CPU's scratch entry, for this program run.
    let entry = unsafe { &mut *scratch };
    ct::lookup_live(&err.quoted_reversed(dir), entry)?;
    let snated = entry.flags & CT_SNAT != 0;
    snat.is_none_or(|snat| snat == snated).then_some(entry)
}

/// Ingress: an error about a packet that left a frontend towards the client
/// (a reply), raised on the client's side and sent to the frontend: the
/// quoted packet reversed is the flow's forward tuple. At an uplink, also an
/// error about a SNATed packet, raised on the backend's side and sent to the
/// SNAT address: the quoted packet reversed is the reply tuple.
#[inline(always)]
fn icmp_error_ingress<A: Edges, E: QuotingError<A>, const EXTERNAL: bool>(
    ctx: &TcContext,
    err: &E,
) -> Outcome {
    // One translation for either kind of flow: each inlined copy of the
    // IPv6 one costs the verifier some 300 000 instructions.
    let entry = match quoted_flow(err, CT_DIR_FORWARD, None) {
        Some(entry) => entry,
        None if EXTERNAL => match quoted_flow(err, CT_DIR_REPLY, Some(true)) {
            Some(entry) => entry,
            None => return Outcome::next(Stat::PassNotService),
        },
        None => return Outcome::next(Stat::PassNotService),
    };
    if err.translate(ctx, entry).is_err() {
        return Outcome::drop(Stat::DropRewrite);
    }
    if entry.flags & CT_SNAT == 0 {
        return Outcome::next(Stat::IcmpTranslated); // on where it was headed
    }
    // An error about a SNATed flow is routed by the program, as the flow's
    // packets are: towards the backend it may come from the SNAT address,
    // towards the client from the frontend (when the backend raised it) —
    // both the node's own, martians to its input path.
    let routed = redirect::lookup(ctx, A::ICMP, &entry.src_addr, &entry.dst_addr, 0)
        .and_then(|route| redirect::send::<A>(ctx, A::ICMP, &route));
    match routed {
        Ok(action) => Outcome {
            action,
            stat: Stat::IcmpTranslated,
        },
        Err(()) => Outcome::drop(Stat::DropRedirect),
    }
}

/// Egress: an error about a packet a client sent through a frontend (now
/// addressed to the backend), raised on the backend's side or by this node
/// while forwarding it: the quoted packet reversed is the reply tuple.
#[inline(always)]
fn icmp_error_egress<A: Family, E: QuotingError<A>>(ctx: &TcContext, err: &E) -> Outcome {
    // SNATed flows are answered at the uplink's ingress, never here.
    match quoted_flow(err, CT_DIR_REPLY, Some(false)) {
        Some(entry) => translated(ctx, err, entry),
        None => Outcome::next(Stat::PassNotReply),
    }
}

/// `loadBalancerSourceRanges`: the client is in one of the frontend's
/// prefixes. A BPF function of its own: its key on the new-flow path's
/// frame took IPv6's past what debug events leave.
#[inline(never)]
fn source_allowed<A: Family>(client: &A, rev_nat_id: u16) -> bool {
    let key = Key::new(
        SOURCE_RANGE_ID_BITS + A::BITS,
        SourceRangeKey::new(rev_nat_id, *client),
    );
    A::source_ranges().get(&key).is_some()
}

/// The answer of a SNATed flow (backend → node:snat_port) goes back to the
/// client from the frontend; `None` for anything else.
#[inline(always)]
fn reverse_snat<A: Edges>(ctx: &TcContext, pkt: &Packet<A>) -> Option<Outcome> {
    let config = A::config()?;
    if config.snat_addr.is_unspecified()
        || !config.snat_addr.same(&pkt.daddr)
        || !config.is_snat_port(u16::from_be(pkt.dport_be))
    {
        return None;
    }
    let reply_key = pkt.ct_key(CT_DIR_REPLY);
    let mut entry = CtValue::default();
    let now = ct::lookup_live(&reply_key, &mut entry)?;
    if entry.flags & CT_SNAT == 0 {
        return None;
    }
    ct::update(&reply_key, &entry, pkt, now);
    Some(send::<A, false>(ctx, pkt, &entry, Stat::RevSnat))
}

/// A backend's reply matches a reply-direction entry and leaves with the
/// frontend as its source; anything else passes untouched.
fn egress(ctx: &TcContext) -> Outcome {
    match parse::parse(ctx) {
        Parsed::Packet(pkt) => frag::recorded::<Ipv4, true>(ctx, &pkt, reply::<Ipv4>(ctx, &pkt)),
        Parsed::Ipv6 => {
            family6::enter(ctx, family6::EGRESS);
            Outcome::next(Stat::PassNotReply) // no IPv6 program there
        }
        Parsed::IcmpError(err) => icmp_error_egress(ctx, &err),
        Parsed::Fragment(frag) => frag::follow::<Ipv4, true>(ctx, &frag),
        Parsed::NotForUs => Outcome::next(Stat::PassNotReply),
        Parsed::Malformed => Outcome::next(Stat::PassMalformed),
    }
}

#[inline(always)]
fn reply<A: Edges>(ctx: &TcContext, pkt: &Packet<A>) -> Outcome {
    let reply_key = pkt.ct_key(CT_DIR_REPLY);
    let mut entry = CtValue::default();
    let Some(now) = ct::lookup_live(&reply_key, &mut entry) else {
        return Outcome::next(Stat::PassNotReply);
    };
    if entry.flags & CT_SNAT != 0 {
        // Answered at the uplink's ingress, never here.
        return Outcome::next(Stat::PassNotReply);
    }
    if pkt.is_tcp_syn_ack() && !ct::forward_is_open(&reply_key, &entry, pkt) {
        // A handshake answer on a tuple whose service flow has closed belongs
        // to another connection: the client reused the port to reach the
        // backend directly. Drop the stale entry; leave the packet alone.
        ct::forget(&reply_key);
        return Outcome::next(Stat::PassNotReply);
    }
    ct::update(&reply_key, &entry, pkt, now);
    send::<A, true>(ctx, pkt, &entry, Stat::RevNat)
}

/// The IP datagram length the way out must carry: the packet's, or for a GSO
/// packet each segment's — its segment size plus the headers every segment
/// repeats (0, leaving the check to the device's MTU, when unknown). Read
/// here, on the routed path only, not for every packet. A GSO packet is
/// known by its segment size: virtio-net and xen-netfront hand over
/// super-packets with `gso_segs` still 0 (the stack counts them later).
#[inline(always)]
fn routed_len<A>(ctx: &TcContext, pkt: &Packet<A>) -> u16 {
    // SAFETY: the context's skb is valid for the program run.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return pkt.tot_len;
    }
    let l4_header = if pkt.proto == lb_common::IPPROTO_TCP {
        match ctx.load::<u8>(pkt.l4_off as usize + 12) {
            Ok(doff) => u32::from(doff >> 4) * 4,
            Err(_) => return 0,
        }
    } else {
        8
    };
    let segment = (gso_size + pkt.ihl_len + l4_header).min(0xffff) as u16;
    // A packet no longer than one segment is sent as it is.
    if pkt.tot_len != 0 && pkt.tot_len < segment {
        pkt.tot_len
    } else {
        segment
    }
}

/// Rewrites the packet to its flow's tuple. A SNATed flow's packet is then
/// routed here (the node's input path would take its source for a martian);
/// any other goes on through the stack. Egress never routes: a SNATed
/// flow's answers are taken at the uplink's ingress (`reply` passes them),
/// and the egress programs keep their stack. (A first fragment is recorded
/// once sent: `frag::recorded`.)
#[inline(always)]
fn send<A: Edges, const EGRESS: bool>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    to: &CtValue<A>,
    stat: Stat,
) -> Outcome {
    if EGRESS || to.flags & CT_SNAT == 0 {
        if nat::translate(ctx, pkt, to).is_err() {
            return Outcome::drop(Stat::DropRewrite);
        }
        return Outcome::next(stat);
    }
    // The route first: a packet too big for the way out is answered in the
    // sender's terms, before translation (as forwarding would, with DF).
    let tot_len = routed_len(ctx, pkt);
    let route = match redirect::lookup(ctx, pkt.proto, &to.src_addr, &to.dst_addr, tot_len) {
        Ok(route) => route,
        Err(()) => return Outcome::drop(Stat::DropRedirect),
    };
    if route.way == redirect::Way::TooBig {
        return A::too_big(ctx, pkt, route.mtu);
    }
    if nat::translate(ctx, pkt, to).is_err() {
        return Outcome::drop(Stat::DropRewrite);
    }
    match redirect::send::<A>(ctx, pkt.proto, &route) {
        Ok(action) => Outcome { action, stat },
        Err(()) => Outcome::drop(Stat::DropRedirect),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
