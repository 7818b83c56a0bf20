//! Connect-time load balancing: cgroup programs for sockets of the
//! processes under `--cgroup-path` (pods, node processes). A connect
//! (TCP, connected UDP) or send (unconnected UDP) to a frontend is pointed
//! at a backend once, in the syscall; the packets then carry the backend's
//! address and the tc programs leave them alone. `getpeername` and
//! `recvmsg` show the frontend again. Session affinity knows the client by
//! its network namespace; frontends with source ranges, which need the
//! client's address, are left to tc. IPv6 sockets reach IPv6 frontends
//! (the same path, generic over the family), and IPv4 frontends through
//! IPv4-mapped addresses. With `SOCK_LB_NETNS` set (socket LB
//! for host-network clients), only sockets of that network namespace —
//! the node's — are translated; pods in their own namespaces keep the tc
//! path.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext as _,
};
use lb_common::{
    affinity::AffinityKey,
    hash::{select_slot, socket_hash},
    ipv4,
    sock::{SockRevNatKey, SockRevNatValue, SOCK_SLOTS},
    stats::Stat,
    svc::{SvcKey, SVC_FLAG_AFFINITY, SVC_FLAG_INTERNAL_LOCAL, SVC_FLAG_SOURCE_RANGES},
    wire, Ipv4, Ipv6, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    affinity,
    family::Family,
    maps::{self, SockRevMap},
    stats::count,
};

/// Verdicts of a sock_addr program.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The network namespace cookie whose sockets are translated; 0: every
/// namespace's. The agent sets it at load.
#[unsafe(no_mangle)]
static SOCK_LB_NETNS: u64 = 0;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    translate_user::<false>(&ctx, Send::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate_user::<false>(&ctx, Send::Datagram)
}

/// An IPv6 socket to an IPv6 frontend, or — a dual-stack socket, as Java
/// and Node.js open them — to an IPv4 frontend through its IPv4-mapped
/// address (`::ffff:a.b.c.d`), translated as an IPv4 socket is, the
/// backend mapped the same way.
#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    translate_user::<true>(&ctx, Send::Connect)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate_user::<true>(&ctx, Send::Datagram)
}

/// The address a sock_addr context holds (its destination, or for
/// recvmsg and getpeername its peer), in the family lb serves it in.
enum UserAddr {
    /// `user_ip4`, or for an IPv6 socket an IPv4-mapped `user_ip6`.
    V4(Ipv4),
    V6(Ipv6),
}

/// The context's address; `V6`: an IPv6 socket's hook.
#[inline(always)]
fn user_addr<const V6: bool>(sa: *mut aya_ebpf::bindings::bpf_sock_addr) -> UserAddr {
    if let Some(addr_be) = user_ipv4::<V6>(sa) {
        return UserAddr::V4(ipv4(addr_be));
    }
    // SAFETY: an IPv6 hook (`user_ipv4` answers every IPv4 one); u32 reads.
    let words = unsafe { (*sa).user_ip6 };
    let mut addr = [0; 16];
    for (i, word) in words.iter().enumerate() {
        addr[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    UserAddr::V6(addr)
}

#[inline(always)]
fn translate_user<const V6: bool>(ctx: &SockAddrContext, send: Send) -> i32 {
    match user_addr::<V6>(ctx.sock_addr) {
        UserAddr::V4(addr) => translate::<Ipv4, V6>(ctx, addr, send),
        UserAddr::V6(addr) => translate::<Ipv6, true>(ctx, addr, send),
    }
}

/// What socket LB needs of a family besides `Family`: its reverse map,
/// the slot of a backend, writing an address back into the context.
trait SockFamily: Family {
    fn reverse() -> &'static SockRevMap<Self>;
    fn key(cookie: u64, backend: &Self, port: u16) -> SockRevNatKey;
    /// Writes `addr` where `user_addr::<V6>` read it from.
    fn set_user_addr<const V6: bool>(sa: *mut aya_ebpf::bindings::bpf_sock_addr, addr: &Self);
}

impl SockFamily for Ipv4 {
    #[inline(always)]
    fn reverse() -> &'static SockRevMap<Self> {
        &maps::SOCK_REVNAT
    }
    #[inline(always)]
    fn key(cookie: u64, backend: &Self, port: u16) -> SockRevNatKey {
        SockRevNatKey::new(cookie, *backend, port)
    }
    #[inline(always)]
    fn set_user_addr<const V6: bool>(sa: *mut aya_ebpf::bindings::bpf_sock_addr, addr: &Self) {
        set_user_ipv4::<V6>(sa, wire(*addr));
    }
}

impl SockFamily for Ipv6 {
    #[inline(always)]
    fn reverse() -> &'static SockRevMap<Self> {
        &maps::SOCK_REVNAT6
    }
    #[inline(always)]
    fn key(cookie: u64, backend: &Self, port: u16) -> SockRevNatKey {
        SockRevNatKey::new6(cookie, backend, port)
    }
    #[inline(always)]
    fn set_user_addr<const V6: bool>(sa: *mut aya_ebpf::bindings::bpf_sock_addr, addr: &Self) {
        for i in 0..4 {
            let word = u32::from_ne_bytes([
                addr[4 * i],
                addr[4 * i + 1],
                addr[4 * i + 2],
                addr[4 * i + 3],
            ]);
            // SAFETY: writable in the IPv6 connect, sendmsg, recvmsg and
            // getpeername hooks, a word at a time.
            unsafe { (*sa).user_ip6[i] = word };
        }
    }
}

/// Whether `entry` is the socket's entry for this backend (a slot holds
/// one backend's at a time).
#[inline(always)]
fn is_backend<A: Family>(entry: &SockRevNatValue<A>, addr: &A, port: u16) -> bool {
    entry.backend_addr.same(addr) && entry.backend_port == port
}

/// The IPv4-mapped prefix's third word (`::ffff:0:0/96`), as
/// `user_ip6[2]` holds it.
const V4_MAPPED_BE: u32 = 0x0000_ffffu32.to_be();

/// The IPv4 address a sock_addr context holds (wire order): its
/// `user_ip4`, or for `V6` the IPv4 address inside an IPv4-mapped
/// `user_ip6` (`None` for any other IPv6 address).
#[inline(always)]
fn user_ipv4<const V6: bool>(sa: *mut aya_ebpf::bindings::bpf_sock_addr) -> Option<u32> {
    // SAFETY: the context is valid for the program run; each hook reads only
    // the fields of its family, as the verifier requires.
    unsafe {
        if !V6 {
            return Some((*sa).user_ip4);
        }
        let ip6 = (*sa).user_ip6;
        (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_BE).then_some(ip6[3])
    }
}

/// Writes `addr` (wire order) where `user_ipv4` read it from.
#[inline(always)]
fn set_user_ipv4<const V6: bool>(sa: *mut aya_ebpf::bindings::bpf_sock_addr, addr: u32) {
    // SAFETY: writable in the connect, sendmsg, recvmsg and getpeername
    // hooks; the mapped prefix stays.
    unsafe {
        if V6 {
            (*sa).user_ip6[3] = addr;
        } else {
            (*sa).user_ip4 = addr;
        }
    }
}

/// A closing socket takes its reverse entries with it.
#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context is valid for the program run.
    let proto = unsafe { (*ctx.sock).protocol };
    if proto != u32::from(IPPROTO_TCP) && proto != u32::from(IPPROTO_UDP) {
        return ALLOW;
    }
    // SAFETY: a plain helper on the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    for slot in 0..SOCK_SLOTS {
        // Most sockets never held one: a miss is the common case.
        let _ = maps::SOCK_REVNAT.remove(&SockRevNatKey::of_slot(cookie, slot));
        let _ = maps::SOCK_REVNAT6.remove(&SockRevNatKey::of_slot(cookie, slot));
    }
    ALLOW
}

/// How the socket reaches the frontend.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Send {
    /// `connect`: the socket's one peer from now on; an older entry in the
    /// slot belongs to a peer it no longer has.
    Connect,
    /// `sendto` on an unconnected socket: one of possibly several peers.
    Datagram,
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_frontend::<false>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    show_frontend::<false>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    show_frontend::<true>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    show_frontend::<true>(&ctx);
    ALLOW
}

#[inline(always)]
fn translate<A: SockFamily, const V6: bool>(ctx: &SockAddrContext, addr: A, send: Send) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context is valid for the program run; fields read once.
    let (proto, port_be) = unsafe {
        let proto = match (*sa).protocol {
            p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
            p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
            _ => return ALLOW,
        };
        (proto, (*sa).user_port as u16)
    };
    let port = u16::from_be(port_be);
    let svc = A::services().get_ptr(&SvcKey::new(addr, port, proto, 0));
    // An address of the service CIDRs that no frontend holds is refused,
    // as the tc path rejects its packets.
    if svc.is_none() && !addr.in_service_cidrs() {
        return ALLOW;
    }
    // SAFETY: a read-only global; volatile so the agent's value is used.
    let only = unsafe { core::ptr::read_volatile(&SOCK_LB_NETNS) };
    // SAFETY: the context pointer is valid; the helper only reads it.
    if only != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != only {
        return ALLOW; // a pod with a namespace of its own: the tc path
    }
    let Some(svc) = svc else {
        return refuse();
    };
    // SAFETY: copied at once; the agent may rewrite slot 0 at any time.
    let svc = unsafe { *svc };
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        return ALLOW; // needs the client address: the tc path decides
    }
    if svc.count == 0 {
        return refuse();
    }
    let choices = if svc.flags & SVC_FLAG_INTERNAL_LOCAL != 0 {
        svc.local_count
    } else {
        svc.count
    };
    if choices == 0 {
        return ALLOW; // no local endpoint: the tc path drops, as kube-proxy
    }
    // Affinity knows the client by its network namespace: the socket has
    // no address yet.
    // Only then: the clock and the cookie are not needed otherwise.
    let affinity = if svc.flags & SVC_FLAG_AFFINITY != 0 {
        // SAFETY: the context pointer is valid; the helper only reads it.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        Some((
            AffinityKey::for_netns(netns, svc.rev_nat_id),
            crate::ct::now(),
        ))
    } else {
        None
    };
    let remembered =
        affinity.and_then(|(key, now)| affinity::remembered(&key, &svc, choices != svc.count, now));
    // SAFETY: the context pointer is valid; the helper only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let backend_id = match remembered {
        Some((id, _)) => id,
        None => {
            // No source port exists yet to hash: the socket is the flow.
            let slot = select_slot(socket_hash(cookie), choices);
            let Some(slot_value) = A::services().get_ptr(&SvcKey::new(addr, port, proto, slot))
            else {
                return ALLOW;
            };
            unsafe { (*slot_value).backend_id }
        }
    };
    let Some(backend) = A::backends().get_ptr(&backend_id) else {
        return ALLOW;
    };
    if let Some((key, now)) = affinity {
        affinity::remember(&key, backend_id, now);
    }
    let backend = unsafe { *backend };
    let value = SockRevNatValue {
        backend_addr: backend.addr,
        backend_port: backend.port,
        frontend_port: port,
        frontend_addr: addr,
        rev_nat_id: svc.rev_nat_id,
        _pad: 0,
    };
    if !remember_frontend(&A::key(cookie, &backend.addr, backend.port), &value, send) {
        count(Stat::SockUntranslated);
        return ALLOW; // untranslated: the tc path serves it
    }
    A::set_user_addr::<V6>(sa, &backend.addr);
    // SAFETY: user_port is writable in these hooks.
    unsafe { (*sa).user_port = u32::from(backend.port.to_be()) };
    count(Stat::SockTranslated);
    ALLOW
}

/// Fails the connect or send with ECONNREFUSED, as the tc path's ICMP
/// port unreachable fails it.
#[inline(always)]
fn refuse() -> i32 {
    count(Stat::SockRefused);
    // SAFETY: a plain helper; the syscall fails with this error.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REFUSE
}

/// Writes the socket's entry for a backend; false when it cannot have one.
/// A datagram socket's slot held by another backend stays with it (both
/// peers are live), and the map's NOEXIST insert decides between two
/// threads sending at once.
#[inline(always)]
fn remember_frontend<A: SockFamily>(
    key: &SockRevNatKey,
    value: &SockRevNatValue<A>,
    send: Send,
) -> bool {
    let map = A::reverse();
    if send == Send::Connect {
        return map.insert(key, value, u64::from(BPF_ANY)).is_ok();
    }
    if map.insert(key, value, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    match map.get_ptr(key) {
        // SAFETY: read once; the socket's own entry.
        Some(held) if is_backend(unsafe { &*held }, &value.backend_addr, value.backend_port) => {
            // The same backend through another frontend (or again): the
            // latest frontend is the one the socket sends to.
            map.insert(key, value, u64::from(BPF_ANY)).is_ok()
        }
        _ => false,
    }
}

/// The backend a socket talks to appears as the frontend it asked for.
#[inline(always)]
fn show_frontend<const V6: bool>(ctx: &SockAddrContext) {
    match user_addr::<V6>(ctx.sock_addr) {
        UserAddr::V4(addr) => show_frontend_of::<Ipv4, V6>(ctx, addr),
        UserAddr::V6(addr) => show_frontend_of::<Ipv6, true>(ctx, addr),
    }
}

#[inline(always)]
fn show_frontend_of<A: SockFamily, const V6: bool>(ctx: &SockAddrContext, backend_addr: A) {
    let sa = ctx.sock_addr;
    // SAFETY: as in `translate`.
    let backend_port = unsafe { u16::from_be((*sa).user_port as u16) };
    // SAFETY: as in `translate`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = A::key(cookie, &backend_addr, backend_port);
    let Some(frontend) = A::reverse().get_ptr(&key) else {
        return;
    };
    // SAFETY: copied at once (the release hook may delete it meanwhile).
    let frontend = unsafe { *frontend };
    if !is_backend(&frontend, &backend_addr, backend_port) {
        return; // another backend's entry in this slot
    }
    A::set_user_addr::<V6>(sa, &frontend.frontend_addr);
    // SAFETY: as in `translate`.
    unsafe { (*sa).user_port = u32::from(frontend.frontend_port.to_be()) };
    count(Stat::SockRevNat);
}
