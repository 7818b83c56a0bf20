//! `lb-agent explain NAME.NAMESPACE[.svc[.cluster.local]][:PORT] | IP[:PORT]`:
//! the whole chain for one service in one answer — the name as cluster DNS
//! resolves it, the frontend(s) in the maps with their Service, type and
//! policies, the backends (with conditions and nodes when the objects are
//! at hand), the backend the datapath picks for a client (the real program
//! run on a synthetic packet, see `datapath::probe`), and the live
//! conntrack entries of the Service.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    str::FromStr,
};

use serde::Serialize;

use crate::{
    cli::inspect::{self, FlowInfo, FrontendInfo},
    datapath::offline::probe::Probe,
    model::{FrontendKind, L4Addr, Proto, ServiceName},
    source::store::ObjectStore,
};

const CLUSTER_DOMAIN: &str = "svc.cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(
        "{0:?}: expected NAME.NAMESPACE[.svc[.cluster.local]][:PORT], VIP[:PORT] or NODEIP:NODEPORT"
    )]
    Target(String),
    #[error("--client {0:?}: expected IP, IPv4:PORT or [IPv6]:PORT")]
    Client(String),
    #[error("--client {0} and {1}: one client per address family")]
    Clients(SocketAddr, SocketAddr),
    #[error("{0}: no such Service in the maps{1}")]
    UnknownService(String, &'static str),
    #[error("{0}: no frontend in the maps")]
    UnknownFrontend(String),
    #[error("port {port:?}: Service {service} has no such port (has {have})")]
    UnknownPort {
        service: String,
        port: String,
        have: String,
    },
}

/// What was asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Service by DNS name; the port by number or name.
    Name {
        name: String,
        namespace: String,
        port: Option<String>,
    },
    Address {
        addr: IpAddr,
        port: Option<u16>,
    },
}

impl FromStr for Target {
    type Err = ExplainError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ExplainError::Target(text.to_owned());
        if let Some((addr, port)) = address(text) {
            return Ok(Target::Address { addr, port });
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) if !port.is_empty() => (host, Some(port)),
            Some(_) => return Err(bad()),
            None => (text, None),
        };
        let short = host
            .trim_end_matches('.')
            .strip_suffix(&format!(".{CLUSTER_DOMAIN}"))
            .or_else(|| host.strip_suffix(".svc"))
            .unwrap_or(host);
        let (name, namespace) = short.split_once('.').ok_or_else(bad)?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !label_ok(name) || !label_ok(namespace) {
            return Err(bad());
        }
        Ok(Target::Name {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            port: port.map(str::to_owned),
        })
    }
}

/// An address with or without a port: `IPv4`, `IPv4:PORT`, `IPv6`,
/// `[IPv6]` or `[IPv6]:PORT`.
fn address(text: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Some((a.ip(), Some(a.port())));
    }
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse::<IpAddr>().ok().map(|ip| (ip, None))
}

/// The client to show the pick for, with a port (default 40000).
pub fn parse_client(text: &str) -> Result<SocketAddr, ExplainError> {
    let (ip, port) = address(text).ok_or_else(|| ExplainError::Client(text.to_owned()))?;
    Ok(SocketAddr::new(ip, port.unwrap_or(40000)))
}

/// `--client` values: at most one per family (a dual-stack Service's
/// frontend of each family gets the pick of its family's client).
pub fn parse_clients(texts: &[String]) -> Result<Vec<SocketAddr>, ExplainError> {
    let mut clients: Vec<SocketAddr> = Vec::new();
    for text in texts {
        let client = parse_client(text)?;
        if let Some(other) = clients.iter().find(|c| c.is_ipv4() == client.is_ipv4()) {
            return Err(ExplainError::Clients(*other, client));
        }
        clients.push(client);
    }
    Ok(clients)
}

/// The answer, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub query: String,
    /// How cluster DNS answers the name (absent for an address query).
    pub dns: Option<DnsAnswer>,
    pub frontends: Vec<FrontendExplained>,
    /// Live flows of the Service (all its frontends).
    pub conntrack: Vec<FlowInfo>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DnsAnswer {
    pub name: String,
    /// The cluster IPs (or a headless Service's pod IPs) as `A` and `AAAA`
    /// records, or an ExternalName's `CNAME`.
    pub records: Vec<DnsRecord>,
    /// Why lb is not in the path, when it is not.
    pub note: Option<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DnsRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub value: String,
}

impl DnsRecord {
    /// `A` and `AAAA` records of addresses, IPv4 first, each once.
    fn addresses(addresses: impl IntoIterator<Item = IpAddr>) -> Vec<Self> {
        let mut addresses: Vec<IpAddr> = addresses.into_iter().collect();
        addresses.sort();
        addresses.dedup();
        addresses
            .into_iter()
            .map(|a| Self {
                kind: if a.is_ipv4() { "A" } else { "AAAA" },
                value: a.to_string(),
            })
            .collect()
    }
}

#[derive(Debug, Serialize)]
pub struct FrontendExplained {
    #[serde(flatten)]
    pub frontend: FrontendInfo,
    /// The endpoints behind it as the EndpointSlices list them (with the
    /// objects only).
    pub endpoints: Vec<EndpointInfo>,
    /// What the datapath does with the client's next packet.
    pub pick: Option<Pick>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct EndpointInfo {
    pub address: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    /// In the frontend's slots (used by the datapath).
    pub in_datapath: bool,
}

#[derive(Debug, Serialize)]
pub struct Pick {
    pub client: String,
    /// The ingress program run: pod-facing interfaces or uplinks.
    pub program: &'static str,
    pub verdict: String,
    pub events: Vec<&'static str>,
    /// The destination the packet leaves with (a backend when translated).
    pub backend: Option<String>,
    /// The source it leaves with, when SNATed.
    pub snat: Option<String>,
}

/// Where explain looks.
pub struct Sources<'a> {
    pub pin_dir: &'a Path,
    /// Services and EndpointSlices (headless, ExternalName, conditions),
    /// grouped by Service as the agent groups them.
    pub objects: Option<&'a ObjectStore>,
}

/// `clients`: at most one per family (`parse_clients`).
pub fn explain(
    target: &Target,
    clients: &[SocketAddr],
    sources: &Sources<'_>,
) -> anyhow::Result<Explanation> {
    let snapshot = inspect::snapshot(sources.pin_dir)?;
    let all = inspect::frontends(&snapshot, &inspect::Filter::default());
    let (query, dns, selected, service) = match target {
        Target::Name {
            name,
            namespace,
            port,
        } => {
            let service_name = ServiceName {
                namespace: namespace.as_str().into(),
                name: name.as_str().into(),
            };
            let service = service_name.to_string();
            let fqdn = format!("{name}.{namespace}.{CLUSTER_DOMAIN}");
            if let Some(answer) = dns_without_datapath(sources.objects, &service_name, &fqdn) {
                return Ok(Explanation {
                    query: fqdn,
                    dns: Some(answer),
                    frontends: Vec::new(),
                    conntrack: Vec::new(),
                });
            }
            let cluster_ips: Vec<&FrontendInfo> = all
                .iter()
                .filter(|f| {
                    f.service.as_deref() == Some(service.as_str())
                        && f.kind.as_deref() == Some(FrontendKind::ClusterIp.name())
                })
                .collect();
            if cluster_ips.is_empty() {
                let hint = if sources.objects.is_some() {
                    ""
                } else {
                    " (headless and ExternalName Services are not in the datapath: pass --manifests or --kubeconfig to resolve them)"
                };
                return Err(ExplainError::UnknownService(service, hint).into());
            }
            let wanted_port = match port {
                None => None,
                Some(p) => Some(port_number(
                    p,
                    &service_name,
                    &cluster_ips,
                    sources.objects,
                )?),
            };
            let records = DnsRecord::addresses(cluster_ips.iter().map(|f| f.address));
            let selected: Vec<FrontendInfo> = cluster_ips
                .into_iter()
                .filter(|f| wanted_port.is_none_or(|p| f.port == p))
                .cloned()
                .collect();
            let dns = DnsAnswer {
                name: fqdn.clone(),
                records,
                note: None,
            };
            let query = match port {
                Some(p) => format!("{fqdn}:{p}"),
                None => fqdn,
            };
            (query, Some(dns), selected, Some(service))
        }
        Target::Address { addr, port } => {
            let selected: Vec<FrontendInfo> = all
                .iter()
                .filter(|f| f.address == *addr && port.is_none_or(|p| f.port == p))
                .cloned()
                .collect();
            let query = match port {
                Some(p) => SocketAddr::new(*addr, *p).to_string(),
                None => addr.to_string(),
            };
            if selected.is_empty() {
                return Err(ExplainError::UnknownFrontend(query).into());
            }
            let service = selected.iter().find_map(|f| f.service.clone());
            (query, None, selected, service)
        }
    };

    let mut probe = match clients {
        [] => None,
        _ => Some(Probe::load(sources.pin_dir)?),
    };
    let mut frontends = Vec::new();
    for frontend in selected {
        let client = clients
            .iter()
            .find(|c| c.is_ipv4() == frontend.address.is_ipv4());
        let pick = match (client, probe.as_mut()) {
            (Some(client), Some(probe)) => Some(pick(probe, *client, &frontend)?),
            _ => None,
        };
        let endpoints = sources
            .objects
            .map(|o| endpoints(o, &frontend))
            .unwrap_or_default();
        frontends.push(FrontendExplained {
            frontend,
            endpoints,
            pick,
        });
    }
    let conntrack = inspect::flows(
        sources.pin_dir,
        &snapshot,
        &inspect::Filter {
            service,
            backend: None,
        },
    )?;
    Ok(Explanation {
        query,
        dns,
        frontends,
        conntrack,
    })
}

/// Headless and ExternalName Services: DNS answers without a cluster IP, so
/// lb is not in the path.
fn dns_without_datapath(
    store: Option<&ObjectStore>,
    service: &ServiceName,
    fqdn: &str,
) -> Option<DnsAnswer> {
    let input = store?.input(service);
    let spec = input.definitions.first()?.object.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some(DnsAnswer {
            name: fqdn.to_owned(),
            records: spec
                .external_name
                .iter()
                .map(|name| DnsRecord {
                    kind: "CNAME",
                    value: name.clone(),
                })
                .collect(),
            note: Some("ExternalName: a DNS alias; no frontend, nothing to load-balance".into()),
        });
    }
    if spec.cluster_ip.as_deref() != Some("None") {
        return None;
    }
    let records = DnsRecord::addresses(
        input
            .slices
            .iter()
            .flat_map(|s| &s.object.endpoints)
            .filter(|e| e.ready != Some(false))
            .filter_map(|e| match e.address {
                Some(crate::source::view::EndpointAddress::Ip(ip)) => Some(ip),
                _ => None,
            }),
    );
    Some(DnsAnswer {
        name: fqdn.to_owned(),
        records,
        note: Some("headless: DNS answers with the ready pods' addresses; clients connect to them directly, lb is not in the path".into()),
    })
}

/// A port by number, or by name through the Service object.
fn port_number(
    port: &str,
    service: &ServiceName,
    frontends: &[&FrontendInfo],
    store: Option<&ObjectStore>,
) -> Result<u16, ExplainError> {
    if let Ok(number) = port.parse::<u16>() {
        if frontends.iter().any(|f| f.port == number) {
            return Ok(number);
        }
    } else if let Some(store) = store {
        let by_name = store
            .input(service)
            .definitions
            .first()
            .and_then(|d| d.object.spec.as_ref())
            .and_then(|spec| spec.ports.iter().find(|p| p.name.as_deref() == Some(port)))
            .and_then(|p| u16::try_from(p.port).ok());
        if let Some(number) = by_name {
            return Ok(number);
        }
    }
    let mut have: Vec<String> = frontends.iter().map(|f| f.port.to_string()).collect();
    have.dedup();
    Err(ExplainError::UnknownPort {
        service: service.to_string(),
        port: port.to_owned(),
        have: have.join(", "),
    })
}

fn pick(probe: &mut Probe, client: SocketAddr, frontend: &FrontendInfo) -> anyhow::Result<Pick> {
    let proto = if frontend.protocol == Proto::Udp.to_string() {
        Proto::Udp
    } else {
        Proto::Tcp
    };
    let l4 = L4Addr {
        addr: frontend.address,
        port: frontend.port,
        proto,
    };
    // Cluster IPs are reached from pods; the other kinds from outside.
    let external = frontend.kind.as_deref() != Some(FrontendKind::ClusterIp.name());
    let outcome = probe.first_packet(client, l4, frontend.rev_nat_id, external)?;
    let translated = outcome.destination != SocketAddr::new(frontend.address, frontend.port);
    use lb_common::family6::{self, PROGRAM_NAMES};
    // An IPv6 packet enters the IPv4 program and is decided by the IPv6
    // one it tail-calls.
    let program = match (external, client.is_ipv6()) {
        (false, false) => crate::datapath::INGRESS_PROGRAM,
        (true, false) => crate::datapath::INGRESS_EXTERNAL_PROGRAM,
        (false, true) => PROGRAM_NAMES[family6::INGRESS as usize],
        (true, true) => PROGRAM_NAMES[family6::INGRESS_EXTERNAL as usize],
    };
    Ok(Pick {
        client: client.to_string(),
        program,
        verdict: outcome.verdict,
        events: outcome.events,
        backend: translated.then(|| outcome.destination.to_string()),
        snat: (outcome.source != client).then(|| outcome.source.to_string()),
    })
}

/// The endpoint addresses of the frontend's family its Service lists,
/// with their conditions, and whether the frontend's slots use each.
fn endpoints(store: &ObjectStore, frontend: &FrontendInfo) -> Vec<EndpointInfo> {
    let Some((namespace, name)) = frontend.service.as_deref().and_then(|s| s.split_once('/'))
    else {
        return Vec::new();
    };
    let service = ServiceName {
        namespace: namespace.into(),
        name: name.into(),
    };
    let used: Vec<std::net::IpAddr> = frontend.backends.iter().filter_map(|b| b.address).collect();
    let mut out: Vec<EndpointInfo> = store
        .input(&service)
        .slices
        .iter()
        .flat_map(|s| &s.object.endpoints)
        .filter_map(|e| {
            let address = e.address.as_ref()?.to_string();
            let ip = address.parse::<IpAddr>().ok();
            if ip.is_some_and(|ip| ip.is_ipv4() != frontend.address.is_ipv4()) {
                return None; // the other family's frontend uses it
            }
            let in_datapath = ip.is_some_and(|a| used.contains(&a));
            Some(EndpointInfo {
                address,
                ready: e.ready != Some(false),
                serving: e.serving.unwrap_or(e.ready != Some(false)),
                terminating: e.terminating == Some(true),
                node: e.node_name.as_deref().map(str::to_owned),
                in_datapath,
            })
        })
        .collect();
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out.dedup();
    out
}

/// The explanation as text.
pub fn text(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", e.query);
    if let Some(dns) = &e.dns {
        let mut kinds: Vec<&str> = dns.records.iter().map(|r| r.kind).collect();
        kinds.dedup();
        if kinds.is_empty() {
            let _ = writeln!(out, "  DNS      {} (no records)", dns.name);
        }
        for (i, kind) in kinds.into_iter().enumerate() {
            let values: Vec<&str> = dns
                .records
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| r.value.as_str())
                .collect();
            let _ = writeln!(
                out,
                "  {}{} {kind} {}",
                if i == 0 { "DNS      " } else { "         " },
                dns.name,
                values.join(", ")
            );
        }
        if let Some(note) = &dns.note {
            let _ = writeln!(out, "           ({note})");
        }
    }
    for f in &e.frontends {
        let fr = &f.frontend;
        let mut policies = Vec::new();
        if fr.external_traffic_policy_local {
            policies.push("externalTrafficPolicy=Local".to_owned());
        }
        if fr.internal_traffic_policy_local {
            policies.push("internalTrafficPolicy=Local".to_owned());
        }
        if let Some(t) = fr.affinity_timeout_s {
            policies.push(format!("affinity=ClientIP/{t}s"));
        }
        if !fr.source_ranges.is_empty() {
            policies.push(format!("sourceRanges={}", fr.source_ranges.join(",")));
        }
        let _ = writeln!(
            out,
            "  frontend {} {} service={} revnat={} {}",
            fr.frontend,
            fr.kind.as_deref().unwrap_or("?"),
            fr.service.as_deref().unwrap_or("?"),
            fr.rev_nat_id,
            policies.join(" ")
        );
        if fr.backends.is_empty() {
            let _ = writeln!(out, "    no backends: new connections are refused");
        }
        for b in &fr.backends {
            let backend = match (b.address, b.port) {
                (Some(a), Some(p)) => SocketAddr::new(a, p).to_string(),
                (a, p) => format!(
                    "{}:{}",
                    a.map_or("?".into(), |a| a.to_string()),
                    p.map_or("?".into(), |p| p.to_string())
                ),
            };
            let _ = writeln!(
                out,
                "    slot {:<3} {backend}{}",
                b.slot,
                if b.local { " (this node)" } else { "" }
            );
        }
        for ep in &f.endpoints {
            let _ = writeln!(
                out,
                "    endpoint {} ready={} serving={} terminating={} node={}{}",
                ep.address,
                ep.ready,
                ep.serving,
                ep.terminating,
                ep.node.as_deref().unwrap_or("-"),
                if ep.in_datapath { "" } else { " (not used)" }
            );
        }
        if let Some(p) = &f.pick {
            let _ = writeln!(
                out,
                "    client {} → {} ({}; {} via {}){}",
                p.client,
                p.backend.as_deref().unwrap_or("not translated"),
                p.verdict,
                p.events.join(","),
                p.program,
                p.snat
                    .as_ref()
                    .map(|s| format!(", SNAT to {s}"))
                    .unwrap_or_default()
            );
        }
    }
    if !e.frontends.is_empty() || !e.conntrack.is_empty() {
        // The newest few; `--json` and `inspect conntrack` have them all.
        let mut newest = e.conntrack.clone();
        newest.sort_by(|a, b| a.age_s.total_cmp(&b.age_s));
        newest.truncate(SHOWN_FLOWS);
        let _ = write!(
            out,
            "  conntrack\n{}",
            indent(&inspect::flows_text(&newest))
        );
        if e.conntrack.len() > SHOWN_FLOWS {
            let _ = writeln!(
                out,
                "    (the {SHOWN_FLOWS} newest of {} flows: `inspect conntrack --service NS/NAME` lists all)",
                e.conntrack.len()
            );
        }
    }
    out
}

/// Flows shown in the text form.
const SHOWN_FLOWS: usize = 8;

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_cluster_dns_names_or_addresses() {
        let name = |n: &str, ns: &str, p: Option<&str>| Target::Name {
            name: n.into(),
            namespace: ns.into(),
            port: p.map(Into::into),
        };
        assert_eq!(
            "web.shop".parse::<Target>().unwrap(),
            name("web", "shop", None)
        );
        assert_eq!(
            "web.shop.svc.cluster.local:80".parse::<Target>().unwrap(),
            name("web", "shop", Some("80"))
        );
        assert_eq!(
            "web.shop.svc:http".parse::<Target>().unwrap(),
            name("web", "shop", Some("http"))
        );
        assert_eq!(
            "198.19.0.10:80".parse::<Target>().unwrap(),
            Target::Address {
                addr: IpAddr::from([198, 19, 0, 10]),
                port: Some(80)
            }
        );
        for bad in [
            "web",
            "198.19.0.10:http",
            "Web.shop",
            "web.shop:",
            "a.b.c.d.e",
        ] {
            let e = bad.parse::<Target>().unwrap_err().to_string();
            assert!(e.contains("expected NAME.NAMESPACE"), "{bad}: {e}");
        }
    }

    #[test]
    fn ipv6_targets_and_clients_parse_with_or_without_brackets() {
        let v6: IpAddr = "2001:db8:ffff::10".parse().unwrap();
        for (text, port) in [
            ("2001:db8:ffff::10", None),
            ("[2001:db8:ffff::10]", None),
            ("[2001:db8:ffff::10]:80", Some(80)),
        ] {
            assert_eq!(
                text.parse::<Target>().unwrap(),
                Target::Address { addr: v6, port },
                "{text}"
            );
        }
        assert!("[2001:db8:ffff::10]:http".parse::<Target>().is_err());
        assert_eq!(
            parse_client("2001:db8:1::2").unwrap(),
            "[2001:db8:1::2]:40000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_client("[2001:db8:1::2]:41000").unwrap(),
            "[2001:db8:1::2]:41000".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn one_client_per_family() {
        let texts = |t: &[&str]| t.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let both = parse_clients(&texts(&["198.18.0.2", "2001:db8:1::2"])).unwrap();
        assert_eq!(both.len(), 2);
        let e = parse_clients(&texts(&["198.18.0.2", "198.18.0.3:1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("one client per address family"), "{e}");
    }

    #[test]
    fn cluster_ips_answer_as_a_and_aaaa_records() {
        let addrs: Vec<IpAddr> = ["2001:db8:ffff::10", "198.19.0.10", "198.19.0.10"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let records = DnsRecord::addresses(addrs);
        let got: Vec<(&str, &str)> = records.iter().map(|r| (r.kind, r.value.as_str())).collect();
        assert_eq!(got, [("A", "198.19.0.10"), ("AAAA", "2001:db8:ffff::10")]);
    }

    #[test]
    fn client_port_defaults() {
        assert_eq!(
            parse_client("198.18.0.2").unwrap(),
            SocketAddr::from(([198, 18, 0, 2], 40000))
        );
        assert!(parse_client("nope").is_err());
    }
}
