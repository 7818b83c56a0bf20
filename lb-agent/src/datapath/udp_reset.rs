//! Socket LB, connected UDP: a socket connected through a frontend is bound
//! to one backend for its life (the translation happened in `connect`), so
//! when that backend leaves the service the socket would keep talking to
//! it. Such sockets are reset — the application sees `ECONNABORTED` and, as
//! DNS clients do, opens a new socket that lands on a live backend.
//!
//! How: the socket LB reverse map names, per socket cookie, the backend and
//! frontend. Sockets of backends that left are looked up with sock_diag in
//! every network namespace of the node (found through /proc) and destroyed
//! with `SOCK_DESTROY` (CONFIG_INET_DIAG_DESTROY, in every distribution
//! kernel; the agent needs CAP_SYS_ADMIN for setns and CAP_NET_ADMIN).
//! The in-kernel alternative, `bpf_sock_destroy` from a socket iterator
//! (kernel ≥ 6.5), needs kfunc relocation that the loader does not have.
//! With socket LB for host-network clients only, the translated sockets are
//! all in the agent's own namespace: only it is searched, without setns.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::{IpAddr, SocketAddr},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use lb_common::sock::{SockRevNatKey, SockRevNatValue};
use netlink_packet_core::{NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagDestroy, SockDiagMessage,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::model::{L4Addr, Proto};
use crate::netlink::{self, receive, send};

/// A backend a UDP frontend stopped using: its flows are reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeftBackend {
    pub frontend: L4Addr,
    pub backend_id: u32,
    pub backend: L4Addr,
}

#[derive(Debug, thiserror::Error)]
pub enum UdpResetError {
    #[error("reading the socket LB reverse map: {0}")]
    Map(#[from] MapError),
    #[error("listing network namespaces in /proc: {0}")]
    Namespaces(std::io::Error),
    #[error("entering the network namespace of {0}: {1}")]
    Enter(String, std::io::Error),
    #[error("sock_diag in the network namespace of {0}: {1}")]
    SockDiag(String, std::io::Error),
    #[error("the namespace walk stopped unexpectedly")]
    Aborted,
    #[error(
        "{0} connected UDP socket(s) to reset, but /proc shows no network namespace other than the \
         agent's own (run the agent in the host's PID namespace: hostPID: true)"
    )]
    NoPodNamespaces(usize),
    #[error("{failed} of {namespaces} network namespaces not searched (first: {first}); {reset} socket(s) reset elsewhere; retried")]
    SomeNamespaces {
        failed: usize,
        namespaces: usize,
        first: Box<UdpResetError>,
        reset: usize,
    },
    #[error("gave up after {0} passes that each left a network namespace unsearched")]
    GaveUp(u32),
}

/// Passes a reset gets before its backends are given up on: a namespace
/// that keeps failing (a process in it stuck, permissions) must not keep
/// the agent retrying forever.
pub const MAX_RESET_PASSES: u32 = 5;

/// The backends whose sockets are still to be reset, and how many passes
/// they have had. A pass that searched every namespace ends them (a socket
/// it did not find is gone); one that missed a namespace keeps them for the
/// next, up to `MAX_RESET_PASSES`.
#[derive(Debug, Default)]
pub struct Pending {
    left: BTreeSet<LeftBackend>,
    passes: u32,
}

impl Pending {
    /// Adds backends that left; returns all to reset now.
    pub fn add(&mut self, left: &[LeftBackend]) -> Vec<LeftBackend> {
        if !left.is_empty() {
            // New work starts the count again: these backends had no pass.
            self.passes = 0;
        }
        self.left.extend(left.iter().copied());
        self.left.iter().copied().collect()
    }

    /// Records a pass: `Err(GaveUp)` when the last allowed pass missed a
    /// namespace (the backends are dropped).
    pub fn after_pass(&mut self, searched_everywhere: bool) -> Result<(), UdpResetError> {
        self.passes += 1;
        if searched_everywhere {
            *self = Self::default();
        } else if self.passes >= MAX_RESET_PASSES {
            let passes = self.passes;
            *self = Self::default();
            return Err(UdpResetError::GaveUp(passes));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.left.is_empty()
    }
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resets {
    /// Sockets the reverse map ties to a backend that left.
    pub candidates: usize,
    pub namespaces: usize,
    pub sockets_reset: usize,
}

/// The sockets to reset: socket cookie → the backend it is connected to.
/// The reverse map does not record the protocol; a TCP socket that matches
/// is never found among the UDP sockets and is left alone.
pub fn plan_resets(
    entries: impl IntoIterator<Item = ReverseEntry>,
    left: &[LeftBackend],
) -> BTreeMap<u64, SocketAddr> {
    let left: BTreeSet<(SocketAddr, SocketAddr)> = left
        .iter()
        .filter(|l| l.frontend.proto == Proto::Udp)
        .map(|l| (socket_addr(l.frontend), socket_addr(l.backend)))
        .collect();
    entries
        .into_iter()
        .filter(|e| left.contains(&(e.frontend, e.backend)))
        .map(|e| (e.cookie, e.backend))
        .collect()
}

/// A socket's reverse entry, of either family's map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseEntry {
    pub cookie: u64,
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
}

impl ReverseEntry {
    fn of<A: Into<IpAddr>>(key: SockRevNatKey, value: SockRevNatValue<A>) -> Self {
        Self {
            cookie: key.cookie,
            frontend: SocketAddr::new(value.frontend_addr.into(), value.frontend_port),
            backend: SocketAddr::new(value.backend_addr.into(), value.backend_port),
        }
    }
}

/// Every entry of `map` removed; how many were.
fn remove_all<V: aya::Pod>(
    map: &mut HashMap<MapData, SockRevNatKey, V>,
) -> Result<usize, MapError> {
    let keys: Vec<_> = map.keys().collect::<Result<_, _>>()?;
    let mut removed = 0;
    for key in keys {
        match map.remove(&key) {
            Ok(()) => removed += 1,
            Err(e) if super::is_missing(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

fn socket_addr(a: L4Addr) -> SocketAddr {
    SocketAddr::new(a.addr, a.port)
}

/// The pinned socket LB reverse maps, and the resets still to do.
pub struct UdpResetter {
    map: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    map6: HashMap<MapData, SockRevNatKey, SockRevNatValue<lb_common::Ipv6>>,
    pending: Pending,
    /// Socket LB translates only the agent's own namespace's sockets (the
    /// node's): no other namespace is searched, and no setns is needed.
    own_namespace_only: bool,
}

impl UdpResetter {
    pub fn new(map: Map, map6: Map) -> Result<Self, MapError> {
        Ok(Self {
            map: HashMap::try_from(map)?,
            map6: HashMap::try_from(map6)?,
            pending: Pending::default(),
            own_namespace_only: false,
        })
    }

    pub fn own_namespace_only(self, own_namespace_only: bool) -> Self {
        Self {
            own_namespace_only,
            ..self
        }
    }

    /// Removes every reverse entry (socket LB turned off); returns how many.
    pub fn forget_sockets(&mut self) -> Result<usize, MapError> {
        Ok(remove_all(&mut self.map)? + remove_all(&mut self.map6)?)
    }

    /// Whether an earlier pass missed a namespace and is to be retried
    /// (`reset(&[])`).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Resets the connected UDP sockets of `left` backends, and of those an
    /// earlier pass did not finish, in every network namespace, and forgets
    /// their reverse entries. A namespace that fails is passed over and the
    /// pass retried later.
    pub fn reset(&mut self, left: &[LeftBackend]) -> Result<Resets, UdpResetError> {
        let left = self.pending.add(left);
        if left.is_empty() {
            return Ok(Resets::default());
        }
        let pass = self.pass(&left);
        let searched_everywhere = !matches!(pass, Err(UdpResetError::SomeNamespaces { .. }));
        self.pending.after_pass(searched_everywhere)?;
        pass
    }

    /// Removes the reverse entries of destroyed sockets.
    fn forget(&mut self, destroyed: Vec<(u64, SocketAddr)>) -> Result<(), UdpResetError> {
        for (cookie, backend) in destroyed {
            let removed = match backend.ip() {
                IpAddr::V4(ip) => {
                    self.map
                        .remove(&SockRevNatKey::new(cookie, ip.octets(), backend.port()))
                }
                IpAddr::V6(ip) => {
                    self.map6
                        .remove(&SockRevNatKey::new6(cookie, &ip.octets(), backend.port()))
                }
            };
            match removed {
                Err(e) if !super::is_missing(&e) => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    fn pass(&mut self, left: &[LeftBackend]) -> Result<Resets, UdpResetError> {
        let mut entries = Vec::new();
        for entry in self.map.iter() {
            let (key, value) = entry?;
            entries.push(ReverseEntry::of(key, value));
        }
        for entry in self.map6.iter() {
            let (key, value) = entry?;
            entries.push(ReverseEntry::of(key, value));
        }
        let wanted = plan_resets(entries, left);
        let mut resets = Resets {
            candidates: wanted.len(),
            ..Resets::default()
        };
        if wanted.is_empty() {
            return Ok(resets);
        }
        if self.own_namespace_only {
            resets.namespaces = 1;
            let destroyed = destroy_here(&wanted)
                .map_err(|e| UdpResetError::SockDiag("the agent".into(), e))?;
            resets.sockets_reset = destroyed.len();
            return self.forget(destroyed).map(|()| resets);
        }
        let namespaces = network_namespaces().map_err(UdpResetError::Namespaces)?;
        resets.namespaces = namespaces.len();
        if namespaces.len() <= 1 {
            // Only the agent's own: the pods' processes are not visible.
            return Err(UdpResetError::NoPodNamespaces(resets.candidates));
        }
        let (destroyed, mut failures) = std::thread::scope(|scope| {
            // setns changes the calling thread only: a thread of its own,
            // which ends with the pass.
            scope
                .spawn(|| {
                    in_each_namespace(&namespaces, |owner, file| {
                        reset_in_namespace(owner, file, &wanted)
                    })
                })
                .join()
                .map_err(|_| UdpResetError::Aborted)
        })?;
        resets.sockets_reset = destroyed.len();
        self.forget(destroyed)?;
        if failures.is_empty() {
            return Ok(resets);
        }
        Err(UdpResetError::SomeNamespaces {
            failed: failures.len(),
            namespaces: resets.namespaces,
            first: Box::new(failures.swap_remove(0)),
            reset: resets.sockets_reset,
        })
    }
}

/// One open `ns/net` file per distinct network namespace of the node's
/// processes, with the process it was found through.
fn network_namespaces() -> std::io::Result<Vec<(String, File)>> {
    let mut seen = BTreeSet::new();
    let mut namespaces = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Processes come and go: one that exited is simply skipped.
        let Ok(file) = File::open(entry.path().join("ns/net")) else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if seen.insert((meta.dev(), meta.ino())) {
            namespaces.push((format!("pid {name}"), file));
        }
    }
    Ok(namespaces)
}

/// `step` in each namespace in turn, past the ones that fail: what the
/// others found, and the failures.
fn in_each_namespace<T>(
    namespaces: &[(String, File)],
    mut step: impl FnMut(&str, &File) -> Result<Vec<T>, UdpResetError>,
) -> (Vec<T>, Vec<UdpResetError>) {
    let mut found = Vec::new();
    let mut failures = Vec::new();
    for (owner, file) in namespaces {
        match step(owner, file) {
            Ok(here) => found.extend(here),
            Err(e) => failures.push(e),
        }
    }
    (found, failures)
}

/// Enters the namespace (this thread only) and destroys the wanted sockets
/// there.
fn reset_in_namespace(
    owner: &str,
    file: &File,
    wanted: &BTreeMap<u64, SocketAddr>,
) -> Result<Vec<(u64, SocketAddr)>, UdpResetError> {
    // SAFETY: setns on a valid namespace fd; only this thread moves.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EINVAL) {
            return Ok(Vec::new()); // not a network namespace any more (process gone)
        }
        return Err(UdpResetError::Enter(owner.to_string(), error));
    }
    destroy_here(wanted).map_err(|e| UdpResetError::SockDiag(owner.to_string(), e))
}

/// Destroys the wanted sockets of the current network namespace: connected
/// UDP sockets whose cookie and peer match — IPv4 and IPv6 ones, and
/// dual-stack ones whose peer is IPv4-mapped (its entry is IPv4's).
fn destroy_here(wanted: &BTreeMap<u64, SocketAddr>) -> std::io::Result<Vec<(u64, SocketAddr)>> {
    let socket = netlink::connect(NETLINK_SOCK_DIAG)?;
    let mut matches = Vec::new();
    for (family, any) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: any,
        });
        send(&socket, NLM_F_REQUEST | NLM_F_DUMP, request)?;
        receive(&socket, |message| {
            if let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) = message {
                let id = &response.header.socket_id;
                let cookie = cookie_of(id);
                let peer = match id.destination_address {
                    IpAddr::V6(addr) => addr.to_ipv4_mapped().map_or(IpAddr::V6(addr), IpAddr::V4),
                    v4 => v4,
                };
                let peer = SocketAddr::new(peer, id.destination_port);
                if wanted.get(&cookie) == Some(&peer) {
                    matches.push((family, cookie, peer, id.clone()));
                }
            }
        })?;
    }
    let mut destroyed = Vec::new();
    for (family, cookie, peer, socket_id) in matches {
        let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        }));
        send(&socket, NLM_F_REQUEST | NLM_F_ACK, request)?;
        let mut outcome = Ok(());
        receive(&socket, |message: NetlinkPayload<SockDiagMessage>| {
            if let NetlinkPayload::Error(e) = message {
                if e.code.is_some() {
                    outcome = Err(e.to_io());
                }
            }
        })?;
        match outcome {
            Ok(()) => destroyed.push((cookie, peer)),
            // Closed since the dump.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(destroyed)
}

/// The kernel reports the 64-bit cookie as two native-endian u32 halves,
/// low half first.
fn cookie_of(id: &SocketId) -> u64 {
    let half = |i: usize| {
        u64::from(u32::from_ne_bytes(
            id.cookie[i..i + 4].try_into().unwrap_or([0; 4]),
        ))
    };
    half(0) | (half(4) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(addr: [u8; 4], port: u16) -> L4Addr {
        L4Addr {
            addr: addr.into(),
            port,
            proto: Proto::Udp,
        }
    }

    fn entry(cookie: u64, backend: ([u8; 4], u16), frontend: ([u8; 4], u16)) -> ReverseEntry {
        ReverseEntry::of(
            SockRevNatKey::new(cookie, backend.0, backend.1),
            SockRevNatValue {
                backend_addr: backend.0,
                backend_port: backend.1,
                frontend_port: frontend.1,
                frontend_addr: frontend.0,
                rev_nat_id: 1,
                _pad: 0,
            },
        )
    }

    #[test]
    fn only_sockets_of_the_left_backend_through_that_frontend_are_reset() {
        let vip = ([198, 19, 0, 10], 53);
        let other_vip = ([198, 19, 0, 11], 53);
        let gone = ([198, 18, 1, 1], 5353);
        let stays = ([198, 18, 1, 2], 5353);
        let left = [LeftBackend {
            frontend: udp(vip.0, vip.1),
            backend_id: 7,
            backend: udp(gone.0, gone.1),
        }];
        let entries = [
            entry(1, gone, vip),
            entry(2, stays, vip),
            entry(3, gone, other_vip), // the backend still serves this one
            entry(4, gone, vip),
        ];
        let planned = plan_resets(entries, &left);
        let gone_addr = SocketAddr::new(gone.0.into(), gone.1);
        assert_eq!(planned, BTreeMap::from([(1, gone_addr), (4, gone_addr)]));
    }

    #[test]
    fn an_ipv6_socket_of_the_left_backend_is_reset() {
        let (vip, gone): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (
            "2001:db8:ffff::10".parse().unwrap(),
            "2001:db8:10::2".parse().unwrap(),
        );
        let left = [LeftBackend {
            frontend: L4Addr {
                addr: vip.into(),
                port: 53,
                proto: Proto::Udp,
            },
            backend_id: 7,
            backend: L4Addr {
                addr: gone.into(),
                port: 5353,
                proto: Proto::Udp,
            },
        }];
        let entry = ReverseEntry::of(
            SockRevNatKey::new6(9, &gone.octets(), 5353),
            SockRevNatValue {
                backend_addr: gone.octets(),
                backend_port: 5353,
                frontend_port: 53,
                frontend_addr: vip.octets(),
                rev_nat_id: 1,
                _pad: 0,
            },
        );
        let planned = plan_resets([entry], &left);
        assert_eq!(
            planned,
            BTreeMap::from([(9, SocketAddr::new(gone.into(), 5353))])
        );
    }

    #[test]
    fn tcp_frontends_reset_nothing() {
        let left = [LeftBackend {
            frontend: L4Addr {
                proto: Proto::Tcp,
                ..udp([198, 19, 0, 10], 53)
            },
            backend_id: 7,
            backend: udp([198, 18, 1, 1], 53),
        }];
        let entries = [entry(1, ([198, 18, 1, 1], 53), ([198, 19, 0, 10], 53))];
        assert!(plan_resets(entries, &left).is_empty());
    }

    #[test]
    fn a_namespace_that_fails_is_passed_over_and_the_rest_searched() {
        let namespaces: Vec<(String, File)> = (1..=3)
            .map(|pid| {
                (
                    format!("pid {pid}"),
                    File::open("/proc/self/ns/net").unwrap(),
                )
            })
            .collect();
        let (found, failures) = in_each_namespace(&namespaces, |owner, _| match owner {
            "pid 2" => Err(UdpResetError::Enter(
                owner.to_string(),
                std::io::Error::from_raw_os_error(libc::EPERM),
            )),
            _ => Ok(vec![owner.to_string()]),
        });
        assert_eq!(found, ["pid 1", "pid 3"]);
        assert_eq!(failures.len(), 1);
        assert!(
            matches!(&failures[0], UdpResetError::Enter(owner, _) if owner == "pid 2"),
            "{failures:?}"
        );
    }

    #[test]
    fn a_pass_that_missed_a_namespace_is_retried_then_given_up() {
        let backend = |id| LeftBackend {
            frontend: udp([198, 19, 0, 10], 53),
            backend_id: id,
            backend: udp([198, 18, 1, id as u8], 53),
        };
        let mut pending = Pending::default();
        assert_eq!(pending.add(&[backend(1)]), [backend(1)]);
        pending.after_pass(false).unwrap();
        // The retry carries the first backend with a new one.
        assert_eq!(pending.add(&[backend(2)]), [backend(1), backend(2)]);
        pending.after_pass(true).unwrap();
        assert!(pending.is_empty(), "a full pass ends the work");

        pending.add(&[backend(3)]);
        for _ in 1..MAX_RESET_PASSES {
            pending.after_pass(false).unwrap();
            assert_eq!(pending.add(&[]), [backend(3)]);
        }
        assert!(matches!(
            pending.after_pass(false),
            Err(UdpResetError::GaveUp(MAX_RESET_PASSES))
        ));
        assert!(pending.is_empty());
    }

    #[test]
    fn the_cookie_is_read_low_half_first() {
        let mut id = SocketId::new_v4();
        let cookie: u64 = 0x1122_3344_5566_7788;
        id.cookie[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id.cookie[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        assert_eq!(cookie_of(&id), cookie);
    }
}
