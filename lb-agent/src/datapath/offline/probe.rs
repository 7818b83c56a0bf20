//! What the datapath does with one packet, without touching live state: the
//! embedded object is loaded again with the live service maps (pinned:
//! frontends, slots, backends, reverse NAT, node config, source ranges,
//! affinity matches) and private scratch maps for everything the program
//! writes (conntrack, affinity, counters, socket reverse map). A synthetic
//! first packet from the client runs through the real ingress program with
//! BPF_PROG_TEST_RUN; the client's live conntrack and affinity entries are
//! copied in first, so the answer is what that client's next packet gets.

use std::{borrow::Cow, net::SocketAddrV4, path::Path};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::SchedClassifier,
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
};
use lb_common::{
    affinity::{AffinityKey, AffinityValue, AFFINITY_MAP, AFFINITY_MATCH_MAP},
    backend::BACKEND_MAP,
    config::CONFIG_MAP,
    ct::{CtKey, CtTimeouts, CtValue, CT_ASSURED, CT_DIR_FORWARD, CT_MAP, CT_NEW_MAP},
    revnat::REVNAT_MAP,
    source_range::SOURCE_RANGE_MAP,
    stats::{STATS_MAP, STAT_COUNT, STAT_NAMES},
    svc::SVC_MAP,
};

use crate::datapath::{INGRESS_EXTERNAL_PROGRAM, INGRESS_PROGRAM};
use crate::model::{L4Addr, Proto};

/// The maps the probe reads live (all written by the agent only).
const SHARED: [&str; 7] = [
    SVC_MAP,
    lb_common::maglev::MAGLEV_MAP,
    BACKEND_MAP,
    REVNAT_MAP,
    CONFIG_MAP,
    SOURCE_RANGE_MAP,
    AFFINITY_MATCH_MAP,
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
    #[error("{0}: IPv6 frontends are not probed yet")]
    Ipv6(String),
}

/// The IPv4 address of a frontend the probe was given (checked at its entry).
fn v4(addr: std::net::IpAddr) -> std::net::Ipv4Addr {
    match addr {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
    }
}

/// The outcome of one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `pass` (TCX_NEXT), `drop`, `redirect` or the raw tc verdict.
    pub verdict: String,
    /// The datapath counters the packet moved (`dnat_new`, `drop_…`).
    pub events: Vec<&'static str>,
    /// Where the packet went: its destination after the program.
    pub destination: SocketAddrV4,
    /// Its source after the program (differs when SNATed).
    pub source: SocketAddrV4,
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
            .map_max_entries(AFFINITY_MAP, 64)
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
        for name in [INGRESS_PROGRAM, INGRESS_EXTERNAL_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| ProbeError::Load(format!("program {name} missing")))?;
            program
                .load()
                .map_err(|e| ProbeError::Load(e.to_string()))?;
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
        client: SocketAddrV4,
        frontend: L4Addr,
        rev_nat_id: u16,
        external: bool,
    ) -> Result<Outcome, ProbeError> {
        if frontend.addr.is_ipv6() {
            return Err(ProbeError::Ipv6(frontend.to_string()));
        }
        self.copy_client_state(client, frontend, rev_nat_id)?;
        let frame = first_packet_frame(client, frontend);
        let before = self.counters()?;
        let name = if external {
            INGRESS_EXTERNAL_PROGRAM
        } else {
            INGRESS_PROGRAM
        };
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| ProbeError::Load(format!("program {name} missing")))?;
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
        let addr = |at: usize| -> Option<SocketAddrV4> {
            let ip: [u8; 4] = out.get(at..at + 4)?.try_into().ok()?;
            let port_at = 34 + if at == 26 { 0 } else { 2 };
            let port: [u8; 2] = out.get(port_at..port_at + 2)?.try_into().ok()?;
            Some(SocketAddrV4::new(ip.into(), u16::from_be_bytes(port)))
        };
        Ok(Outcome {
            verdict: verdict_name(result.return_value as i32),
            events,
            destination: addr(30).unwrap_or(SocketAddrV4::new(v4(frontend.addr), frontend.port)),
            source: addr(26).unwrap_or(client),
        })
    }

    /// The client's live conntrack entries for this frontend and its
    /// affinity entry, into the private tables (emptied first).
    fn copy_client_state(
        &mut self,
        client: SocketAddrV4,
        frontend: L4Addr,
        rev_nat_id: u16,
    ) -> Result<(), ProbeError> {
        let forward = CtKey::new(
            client.ip().octets(),
            client.port(),
            v4(frontend.addr).octets(),
            frontend.port,
            frontend.proto.number(),
            CT_DIR_FORWARD,
        );
        let live = crate::datapath::loader::open_conntrack(&self.pin_dir)
            .map_err(|e| ProbeError::Map(CT_MAP, e.to_string()))?;
        let mut flow = Vec::new();
        if let Some(value) = live.get(&forward) {
            let peer_key = forward.peer_key(&value);
            flow.push((forward, value));
            flow.extend(live.get(&peer_key).map(|peer| (peer_key, peer)));
        }
        for name in [CT_MAP, CT_NEW_MAP] {
            let mut ct: HashMap<&mut MapData, CtKey, CtValue> = self
                .ebpf
                .map_mut(name)
                .and_then(|m| m.try_into().ok())
                .ok_or(ProbeError::Map(name, "missing".into()))?;
            let keys: Vec<CtKey> = ct.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = ct.remove(&key);
            }
            // Each entry into the table it came from.
            for (key, value) in &flow {
                if (value.flags & CT_ASSURED != 0) == (name == CT_MAP) {
                    ct.insert(key, value, 0)
                        .map_err(|e| ProbeError::Map(name, e.to_string()))?;
                }
            }
        }

        let key = AffinityKey::new(client.ip().octets(), rev_nat_id);
        let live: HashMap<MapData, AffinityKey, AffinityValue> =
            pinned(&self.pin_dir, AFFINITY_MAP)?;
        let remembered = live.get(&key, 0).ok();
        let mut affinity: HashMap<&mut MapData, AffinityKey, AffinityValue> = self
            .ebpf
            .map_mut(AFFINITY_MAP)
            .and_then(|m| m.try_into().ok())
            .ok_or(ProbeError::Map(AFFINITY_MAP, "missing".into()))?;
        let _ = affinity.remove(&key);
        if let Some(value) = remembered {
            affinity
                .insert(key, value, 0)
                .map_err(|e| ProbeError::Map(AFFINITY_MAP, e.to_string()))?;
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

/// Ethernet + IPv4 + a TCP SYN or a UDP datagram, checksums valid.
fn first_packet_frame(client: SocketAddrV4, frontend: L4Addr) -> Vec<u8> {
    let l4_len = match frontend.proto {
        Proto::Tcp => 20,
        Proto::Udp => 8,
    };
    let mut f = vec![0u8; 14 + 20 + l4_len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x0b]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x0a]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = frontend.proto.number();
    ip[12..16].copy_from_slice(&client.ip().octets());
    ip[16..20].copy_from_slice(&v4(frontend.addr).octets());
    let sum = checksum(ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let l4 = &mut f[34..];
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
    let pseudo = pseudo_header_sum(client, frontend, l4_len as u16);
    let sum = checksum(&f[34..], pseudo);
    let at = 34 + if frontend.proto == Proto::Tcp { 16 } else { 6 };
    f[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    f
}

fn pseudo_header_sum(client: SocketAddrV4, frontend: L4Addr, len: u16) -> u32 {
    let words = |b: [u8; 4]| {
        u32::from(u16::from_be_bytes([b[0], b[1]])) + u32::from(u16::from_be_bytes([b[2], b[3]]))
    };
    words(client.ip().octets())
        + words(v4(frontend.addr).octets())
        + u32::from(frontend.proto.number())
        + u32::from(len)
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
    fn the_synthetic_packet_has_valid_checksums() {
        let client = SocketAddrV4::new([198, 18, 0, 2].into(), 40000);
        for proto in [Proto::Tcp, Proto::Udp] {
            let frontend = L4Addr {
                addr: [198, 19, 0, 10].into(),
                port: 80,
                proto,
            };
            let f = first_packet_frame(client, frontend);
            assert_eq!(checksum(&f[14..34], 0), 0, "IPv4 header");
            let len = (f.len() - 34) as u16;
            assert_eq!(
                checksum(&f[34..], pseudo_header_sum(client, frontend, len)),
                0,
                "{proto}"
            );
        }
    }
}
