//! What the datapath does with one packet, without touching live state: the
//! embedded object is loaded again with the live service maps (pinned:
//! frontends, slots, backends, reverse NAT, node config, source ranges,
//! affinity matches, of both families) and private scratch maps for
//! everything the programs write (conntrack, affinity, counters, socket
//! reverse map, the IPv6 program array). A synthetic first packet from the
//! client, IPv4 or IPv6, runs through the real ingress program with
//! BPF_PROG_TEST_RUN (IPv6 tail-calls into the IPv6 programs, as on the
//! node); the client's live conntrack and affinity entries are copied in
//! first, so the answer is what that client's next packet gets.

use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, ProgramArray},
    programs::SchedClassifier,
    Ebpf, EbpfLoader, Pod, TestRun as _, TestRunOptions,
};
use lb_common::{
    affinity::{AffinityKey, AffinityValue, AFFINITY6_MAP, AFFINITY_MAP, AFFINITY_MATCH_MAP},
    backend::{BACKEND6_MAP, BACKEND_MAP},
    config::{CONFIG6_MAP, CONFIG_MAP},
    ct::{
        CtKey, CtTimeouts, CtValue, CT6_MAP, CT6_NEW_MAP, CT_ASSURED, CT_DIR_FORWARD, CT_MAP,
        CT_NEW_MAP,
    },
    family6::{self, PROGRAMS6_MAP, PROGRAM_NAMES},
    revnat::{REVNAT6_MAP, REVNAT_MAP},
    source_range::{SOURCE_RANGE6_MAP, SOURCE_RANGE_MAP},
    stats::{STATS_MAP, STAT_COUNT, STAT_NAMES},
    svc::{SVC6_MAP, SVC_MAP},
};

use crate::datapath::{
    conntrack::{Conntrack, CtAddr},
    INGRESS_EXTERNAL_PROGRAM, INGRESS_PROGRAM,
};
use crate::model::{L4Addr, Proto};

/// The maps the probe reads live (all written by the agent only).
const SHARED: [&str; 12] = [
    SVC_MAP,
    SVC6_MAP,
    lb_common::maglev::MAGLEV_MAP,
    BACKEND_MAP,
    BACKEND6_MAP,
    REVNAT_MAP,
    REVNAT6_MAP,
    CONFIG_MAP,
    CONFIG6_MAP,
    SOURCE_RANGE_MAP,
    SOURCE_RANGE6_MAP,
    AFFINITY_MATCH_MAP,
];

/// The IPv6 programs a first packet can run through: the IPv4 entry
/// programs tail-call into them, as on the node.
const FIRST_PACKET6: [u32; 4] = [
    family6::INGRESS,
    family6::INGRESS_EXTERNAL,
    family6::NEW_FLOW,
    family6::NEW_FLOW_EXTERNAL,
];

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}: not pinned (is lb-agent running with this --pin-dir?)")]
    NotPinned(String),
    #[error("loading the datapath: {0}")]
    Load(String),
    #[error("reading {0}: {1}")]
    Map(&'static str, String),
    #[error("BPF_PROG_TEST_RUN: {0}")]
    Run(String),
    #[error("client {client} and frontend {frontend} are of different address families")]
    Family {
        client: SocketAddr,
        frontend: String,
    },
}

/// The outcome of one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `pass` (TCX_NEXT), `drop`, `redirect` or the raw tc verdict.
    pub verdict: String,
    /// The datapath counters the packet moved (`dnat_new`, `drop_…`).
    pub events: Vec<&'static str>,
    /// Where the packet went: its destination after the program.
    pub destination: SocketAddr,
    /// Its source after the program (differs when SNATed).
    pub source: SocketAddr,
}

pub struct Probe {
    ebpf: Ebpf,
    pin_dir: std::path::PathBuf,
}

impl Probe {
    pub fn load(pin_dir: &Path) -> Result<Self, ProbeError> {
        for name in SHARED {
            if !pin_dir.join(name).exists() {
                return Err(ProbeError::NotPinned(
                    pin_dir.join(name).display().to_string(),
                ));
            }
        }
        let mut loader = EbpfLoader::new();
        // Small private tables: one flow, one client.
        loader
            .map_max_entries(CT_MAP, 64)
            .map_max_entries(CT_NEW_MAP, 64)
            .map_max_entries(CT6_MAP, 64)
            .map_max_entries(CT6_NEW_MAP, 64)
            .map_max_entries(AFFINITY_MAP, 64)
            .map_max_entries(AFFINITY6_MAP, 64)
            .override_global("CT_TIMEOUTS", &CtTimeouts::DEFAULT, true)
            .override_global(aya_log::LEVEL, &0u8, true);
        for name in SHARED {
            loader.map_pin_path(name, Cow::Owned(pin_dir.join(name)));
        }
        if crate::datapath::EBPF_OBJECT.is_empty() {
            let not_embedded = crate::datapath::loader::LoadError::NotEmbedded;
            return Err(ProbeError::Load(not_embedded.to_string()));
        }
        let mut ebpf = loader
            .load(crate::datapath::EBPF_OBJECT)
            .map_err(|e| ProbeError::Load(e.to_string()))?;
        let programs6 = FIRST_PACKET6.map(|i| PROGRAM_NAMES[i as usize]);
        for name in [INGRESS_PROGRAM, INGRESS_EXTERNAL_PROGRAM]
            .into_iter()
            .chain(programs6)
        {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|e| ProbeError::Load(format!("{name}: {e}")))?;
        }
        // The private program array: the live one holds the node's
        // programs, which write the live conntrack.
        let mut fds = Vec::new();
        for index in FIRST_PACKET6 {
            let name = PROGRAM_NAMES[index as usize];
            let fd = classifier(&mut ebpf, name)?
                .fd()
                .and_then(|fd| fd.try_clone().map_err(Into::into))
                .map_err(|e| ProbeError::Load(format!("{name}: {e}")))?;
            fds.push((index, fd));
        }
        let error = |e: aya::maps::MapError| ProbeError::Map(PROGRAMS6_MAP, e.to_string());
        let map = ebpf
            .map_mut(PROGRAMS6_MAP)
            .ok_or(ProbeError::Map(PROGRAMS6_MAP, "missing".into()))?;
        let mut array = ProgramArray::try_from(map).map_err(error)?;
        for (index, fd) in &fds {
            array.set(*index, fd, 0).map_err(error)?;
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// The first packet (TCP SYN or a UDP datagram) of `client` → `frontend`
    /// through the ingress program of pod-facing interfaces, or with
    /// `external` that of the uplinks.
    pub fn first_packet(
        &mut self,
        client: SocketAddr,
        frontend: L4Addr,
        rev_nat_id: u16,
        external: bool,
    ) -> Result<Outcome, ProbeError> {
        let front = SocketAddr::new(frontend.addr, frontend.port);
        match (client.ip(), frontend.addr) {
            (IpAddr::V4(c), IpAddr::V4(f)) => self.copy_client_state(
                [CT_MAP, CT_NEW_MAP, AFFINITY_MAP],
                crate::datapath::loader::open_conntrack,
                (c.octets(), f.octets()),
                client,
                frontend,
                rev_nat_id,
            )?,
            (IpAddr::V6(c), IpAddr::V6(f)) => self.copy_client_state(
                [CT6_MAP, CT6_NEW_MAP, AFFINITY6_MAP],
                crate::datapath::loader::open_conntrack6,
                (c.octets(), f.octets()),
                client,
                frontend,
                rev_nat_id,
            )?,
            _ => {
                return Err(ProbeError::Family {
                    client,
                    frontend: frontend.to_string(),
                })
            }
        }
        let frame = first_packet_frame(client, frontend);
        let before = self.counters()?;
        let name = if external {
            INGRESS_EXTERNAL_PROGRAM
        } else {
            INGRESS_PROGRAM
        };
        let program = classifier(&mut self.ebpf, name)?;
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(|e| ProbeError::Run(e.to_string()))?;
        out.truncate(result.data_size_out as usize);
        let after = self.counters()?;
        let events = (0..STAT_COUNT as usize)
            .filter(|i| after[*i] > before[*i])
            .map(|i| STAT_NAMES[i])
            .collect();
        let layout = Layout::of(client.ip());
        Ok(Outcome {
            verdict: verdict_name(result.return_value as i32),
            events,
            destination: layout.address(&out, Side::Destination).unwrap_or(front),
            source: layout.address(&out, Side::Source).unwrap_or(client),
        })
    }

    /// The client's live conntrack entries for this frontend and its
    /// affinity entry, into the private tables of their family (`tables`:
    /// assured, new, affinity; emptied first).
    fn copy_client_state<A: CtAddr>(
        &mut self,
        tables: [&'static str; 3],
        open_live: fn(&Path) -> Result<Conntrack<A>, crate::datapath::loader::LoadError>,
        (client_addr, frontend_addr): (A, A),
        client: SocketAddr,
        frontend: L4Addr,
        rev_nat_id: u16,
    ) -> Result<(), ProbeError>
    where
        CtKey<A>: Pod,
        CtValue<A>: Pod,
        AffinityKey<A>: Pod,
    {
        let [assured, new, affinity_table] = tables;
        let live = open_live(&self.pin_dir).map_err(|e| ProbeError::Map(assured, e.to_string()))?;
        let forward = CtKey::new(
            client_addr,
            client.port(),
            frontend_addr,
            frontend.port,
            frontend.proto.number(),
            CT_DIR_FORWARD,
        );
        let mut flow = Vec::new();
        if let Some(value) = live.get(&forward) {
            let peer_key = forward.peer_key(&value);
            flow.push((forward, value));
            flow.extend(live.get(&peer_key).map(|peer| (peer_key, peer)));
        }
        for name in [assured, new] {
            let mut ct: HashMap<&mut MapData, CtKey<A>, CtValue<A>> = self
                .ebpf
                .map_mut(name)
                .and_then(|m| m.try_into().ok())
                .ok_or(ProbeError::Map(name, "missing".into()))?;
            let keys: Vec<CtKey<A>> = ct.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = ct.remove(&key);
            }
            // Each entry into the table it came from.
            for (key, value) in &flow {
                if (value.flags & CT_ASSURED != 0) == (name == assured) {
                    ct.insert(key, value, 0)
                        .map_err(|e| ProbeError::Map(name, e.to_string()))?;
                }
            }
        }

        let key = AffinityKey::new(client_addr, rev_nat_id);
        let live: HashMap<MapData, AffinityKey<A>, AffinityValue> =
            pinned(&self.pin_dir, affinity_table)?;
        let remembered = live.get(&key, 0).ok();
        let mut affinity: HashMap<&mut MapData, AffinityKey<A>, AffinityValue> = self
            .ebpf
            .map_mut(affinity_table)
            .and_then(|m| m.try_into().ok())
            .ok_or(ProbeError::Map(affinity_table, "missing".into()))?;
        let _ = affinity.remove(&key);
        if let Some(value) = remembered {
            affinity
                .insert(key, value, 0)
                .map_err(|e| ProbeError::Map(affinity_table, e.to_string()))?;
        }
        Ok(())
    }

    fn counters(&self) -> Result<Vec<u64>, ProbeError> {
        let map: PerCpuArray<&MapData, u64> = self
            .ebpf
            .map(STATS_MAP)
            .and_then(|m| m.try_into().ok())
            .ok_or(ProbeError::Map(STATS_MAP, "missing".into()))?;
        (0..STAT_COUNT)
            .map(|i| {
                map.get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(|e| ProbeError::Map(STATS_MAP, e.to_string()))
            })
            .collect()
    }
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, ProbeError> {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| ProbeError::Load(format!("program {name} missing")))
}

fn pinned<T: TryFrom<aya::maps::Map>>(pin_dir: &Path, name: &'static str) -> Result<T, ProbeError> {
    let map = crate::datapath::loader::open_pinned(pin_dir, name)
        .map_err(|e| ProbeError::Map(name, e.to_string()))?;
    T::try_from(map).map_err(|_| ProbeError::Map(name, "unexpected map type".into()))
}

fn verdict_name(verdict: i32) -> String {
    match verdict {
        -1 => "pass".into(), // TCX_NEXT / TC_ACT_UNSPEC
        0 => "pass".into(),  // TC_ACT_OK
        2 => "drop".into(),  // TC_ACT_SHOT
        7 => "redirect".into(),
        other => format!("tc verdict {other}"),
    }
}

/// Where a family's frame (Ethernet, IP header without options) holds
/// what the probe writes and reads.
struct Layout {
    ethertype: u16,
    ip_header: usize,
    /// The source address's offset in the frame; the destination follows.
    saddr: usize,
    addr_len: usize,
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

impl Layout {
    fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self {
                ethertype: 0x0800,
                ip_header: 20,
                saddr: 14 + 12,
                addr_len: 4,
            },
            IpAddr::V6(_) => Self {
                ethertype: 0x86dd,
                ip_header: 40,
                saddr: 14 + 8,
                addr_len: 16,
            },
        }
    }

    fn l4(&self) -> usize {
        14 + self.ip_header
    }

    /// An address and its port, as the frame carries them.
    fn address(&self, frame: &[u8], side: Side) -> Option<SocketAddr> {
        let (at, port_at) = match side {
            Side::Source => (self.saddr, self.l4()),
            Side::Destination => (self.saddr + self.addr_len, self.l4() + 2),
        };
        let bytes = frame.get(at..at + self.addr_len)?;
        let ip = match self.addr_len {
            4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
            _ => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        };
        let port: [u8; 2] = frame.get(port_at..port_at + 2)?.try_into().ok()?;
        Some(SocketAddr::new(ip, u16::from_be_bytes(port)))
    }
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Ethernet + IPv4 or IPv6 + a TCP SYN or a UDP datagram, checksums valid
/// (the family is the client's; the frontend's is the same).
fn first_packet_frame(client: SocketAddr, frontend: L4Addr) -> Vec<u8> {
    let layout = Layout::of(client.ip());
    let l4_len = match frontend.proto {
        Proto::Tcp => 20,
        Proto::Udp => 8,
    };
    let mut f = vec![0u8; layout.l4() + l4_len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x0b]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x0a]);
    f[12..14].copy_from_slice(&layout.ethertype.to_be_bytes());
    let (src, dst) = (octets(client.ip()), octets(frontend.addr));
    f[layout.saddr..layout.saddr + layout.addr_len].copy_from_slice(&src);
    let daddr = layout.saddr + layout.addr_len;
    f[daddr..daddr + layout.addr_len].copy_from_slice(&dst);
    let ip = &mut f[14..layout.l4()];
    if layout.addr_len == 4 {
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = frontend.proto.number();
        let sum = checksum(ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
    } else {
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        ip[6] = frontend.proto.number();
        ip[7] = 64;
    }
    let l4 = &mut f[layout.l4()..];
    l4[0..2].copy_from_slice(&client.port().to_be_bytes());
    l4[2..4].copy_from_slice(&frontend.port.to_be_bytes());
    match frontend.proto {
        Proto::Tcp => {
            l4[4..8].copy_from_slice(&1u32.to_be_bytes()); // seq
            l4[12] = 5 << 4;
            l4[13] = 0x02; // SYN
            l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        }
        Proto::Udp => l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes()),
    }
    let pseudo = pseudo_header_sum(&src, &dst, frontend.proto, l4_len as u16);
    let sum = checksum(l4, pseudo);
    let at = if frontend.proto == Proto::Tcp { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The pseudo-header's sum: the same words in both families (IPv6's
/// 32-bit length and next header sum as IPv4's 16-bit ones do).
fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: Proto, len: u16) -> u32 {
    let words = |b: &[u8]| -> u32 {
        b.chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum()
    };
    words(src) + words(dst) + u32::from(proto.number()) + u32::from(len)
}

/// The Internet checksum of `data`, starting from `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synthetic_packets_have_valid_checksums_in_both_families() {
        let v4: SocketAddr = "198.18.0.2:40000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8:1::2]:40000".parse().unwrap();
        let frontends: [IpAddr; 2] = [
            "198.19.0.10".parse().unwrap(),
            "2001:db8:ffff::10".parse().unwrap(),
        ];
        for (client, addr) in [(v4, frontends[0]), (v6, frontends[1])] {
            for proto in [Proto::Tcp, Proto::Udp] {
                let frontend = L4Addr {
                    addr,
                    port: 80,
                    proto,
                };
                let f = first_packet_frame(client, frontend);
                let layout = Layout::of(client.ip());
                if client.is_ipv4() {
                    assert_eq!(checksum(&f[14..34], 0), 0, "IPv4 header");
                } else {
                    assert_eq!(f[14] >> 4, 6);
                    assert_eq!(u16::from_be_bytes([f[18], f[19]]) as usize, f.len() - 54);
                }
                let len = (f.len() - layout.l4()) as u16;
                let sum = pseudo_header_sum(&octets(client.ip()), &octets(addr), proto, len);
                assert_eq!(checksum(&f[layout.l4()..], sum), 0, "{client} {proto}");
                assert_eq!(layout.address(&f, Side::Source), Some(client));
                assert_eq!(
                    layout.address(&f, Side::Destination),
                    Some(SocketAddr::new(addr, 80))
                );
            }
        }
    }
}
