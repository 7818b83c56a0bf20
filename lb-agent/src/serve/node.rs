//! This node as the datapath needs it: its name (which endpoints are
//! local), the addresses node ports are served on, and the address and
//! ports external flows to other nodes' backends are SNATed to.

use std::{net::IpAddr, ops::RangeInclusive, sync::Arc};

use futures::StreamExt as _;
use ipnet::IpNet;
use lb_common::config::NodeConfig;

use crate::{
    datapath::loader::NodeConfigs,
    desired::{local_redirect::LocalRedirect, NodeContext},
};

/// An address of one of this namespace's interfaces: IPv4, or IPv6 but
/// for link-local ones (no node port or SNAT address: they name no node
/// beyond its link).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub ifindex: u32,
    pub addr: IpAddr,
}

/// What the agent's flags say about this node.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub name: Arc<str>,
    /// `--nodeport-addresses`, of either family; empty: the external
    /// interfaces' addresses.
    pub nodeport_cidrs: Vec<IpNet>,
    /// `--snat-address`, at most one per family (checked by the CLI); a
    /// family without one: the first external interface's first address
    /// of the family.
    pub snat_addresses: Vec<IpAddr>,
    pub snat_ports: RangeInclusive<u16>,
    /// This node's zone: `--node-zone`, then (API mode) its Node's
    /// `topology.kubernetes.io/zone` label as it changes.
    pub zone: Option<Arc<str>>,
    /// `--local-redirect`: in force while its address is on the node.
    pub local_redirects: Vec<LocalRedirect>,
}

impl NodeSettings {
    /// The node context and datapath config for the current addresses;
    /// `external` are the ifindexes of the external interfaces, in order.
    pub fn resolve(
        &self,
        addresses: &[InterfaceAddress],
        external: &[u32],
    ) -> (NodeContext, NodeConfigs) {
        let on_external = || {
            external
                .iter()
                .flat_map(|i| addresses.iter().filter(move |a| a.ifindex == *i))
                .map(|a| a.addr)
        };
        let mut nodeport_addresses: Vec<IpAddr> = if self.nodeport_cidrs.is_empty() {
            on_external().collect()
        } else {
            addresses
                .iter()
                .map(|a| a.addr)
                .filter(|a| self.nodeport_cidrs.iter().any(|c| c.contains(a)))
                .collect()
        };
        nodeport_addresses.sort_unstable();
        nodeport_addresses.dedup();
        let snat = |v6: bool| {
            self.snat_addresses
                .iter()
                .copied()
                .find(|a| a.is_ipv6() == v6)
                .or_else(|| on_external().find(|a| a.is_ipv6() == v6))
        };
        let local_redirects = self
            .local_redirects
            .iter()
            .filter(|r| addresses.iter().any(|a| a.addr == IpAddr::V4(r.address)))
            .map(|r| ((r.service.clone(), r.port), r.address))
            .collect();
        let context = NodeContext {
            name: Some(self.name.clone()),
            nodeport_addresses,
            zone: self.zone.clone(),
            local_redirects,
        };
        let (first, last) = (*self.snat_ports.start(), *self.snat_ports.end());
        let config = NodeConfigs {
            v4: NodeConfig {
                snat_addr: match snat(false) {
                    Some(IpAddr::V4(a)) => a.octets(),
                    _ => [0; 4],
                },
                snat_port_first: first,
                snat_port_last: last,
            },
            v6: NodeConfig {
                snat_addr: match snat(true) {
                    Some(IpAddr::V6(a)) => a.octets(),
                    _ => [0; 16],
                },
                snat_port_first: first,
                snat_port_last: last,
            },
        };
        (context, config)
    }
}

/// `1024-29999`.
pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (first, last) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: expected FIRST-LAST, e.g. 1024-29999"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{text:?}: {p:?} is not a port 1-65535"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!("{text:?}: the first port is above the last"));
    }
    Ok(first..=last)
}

/// The SNAT ports must lie outside the range the node's own sockets get
/// ports from, or a SNATed flow and a node connection could share a tuple.
pub fn check_snat_ports(snat: &RangeInclusive<u16>) -> Result<(), String> {
    const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(SYSCTL).map_err(|e| format!("reading {SYSCTL}: {e}"))?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (parts.next(), parts.next()) else {
        return Err(format!("{SYSCTL}: unexpected content {text:?}"));
    };
    if *snat.start() <= high && low <= *snat.end() {
        return Err(format!(
            "--snat-port-range {}-{} overlaps net.ipv4.ip_local_port_range {low}-{high}: \
             the node's own connections could take a SNAT port; pick ports outside it",
            snat.start(),
            snat.end()
        ));
    }
    Ok(())
}

/// Every address in this network namespace, as `InterfaceAddress` takes
/// them.
pub async fn interface_addresses() -> std::io::Result<Vec<InterfaceAddress>> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut messages = handle.address().get().execute();
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.map_err(std::io::Error::other)?;
        for attr in &message.attributes {
            // IPv6 interfaces have no `Local`: their `Address` is theirs.
            let addr = match attr {
                AddressAttribute::Local(addr @ IpAddr::V4(_)) => *addr,
                AddressAttribute::Address(addr @ IpAddr::V6(v6)) if !v6.is_unicast_link_local() => {
                    *addr
                }
                _ => continue,
            };
            out.push(InterfaceAddress {
                ifindex: message.header.index,
                addr,
            });
        }
    }
    task.abort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn settings(cidrs: &[&str]) -> NodeSettings {
        NodeSettings {
            name: "node-a".into(),
            nodeport_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            snat_addresses: Vec::new(),
            snat_ports: 61000..=65535,
            zone: None,
            local_redirects: vec![
                "kube-system/kube-dns:53=198.18.20.1".parse().unwrap(),
                "kube-system/kube-dns:9153=169.254.20.10".parse().unwrap(),
            ],
        }
    }

    const fn v4(ifindex: u32, a: [u8; 4]) -> InterfaceAddress {
        InterfaceAddress {
            ifindex,
            addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
        }
    }

    fn v6(ifindex: u32, a: &str) -> InterfaceAddress {
        InterfaceAddress {
            ifindex,
            addr: a.parse().unwrap(),
        }
    }

    const ADDRESSES: [InterfaceAddress; 3] = [
        v4(1, [127, 0, 0, 1]),
        v4(2, [198, 18, 0, 2]),
        v4(3, [198, 18, 20, 1]),
    ];

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn node_ports_default_to_the_external_interfaces_addresses() {
        let (context, config) = settings(&[]).resolve(&ADDRESSES, &[2]);
        assert_eq!(context.nodeport_addresses, [ip("198.18.0.2")]);
        assert_eq!(config.v4.snat_addr, [198, 18, 0, 2]);
        assert_eq!(
            (config.v4.snat_port_first, config.v4.snat_port_last),
            (61000, 65535)
        );
        assert_eq!(
            config.v6.snat_addr, [0; 16],
            "no IPv6 address: no IPv6 SNAT"
        );
    }

    #[test]
    fn a_dual_stack_uplink_serves_node_ports_and_snat_in_both_families() {
        let mut addresses = ADDRESSES.to_vec();
        addresses.push(v6(2, "2001:db8:18::2"));
        addresses.push(v6(2, "2001:db8:18::3"));
        addresses.push(v6(3, "2001:db8:20::1"));
        let (context, config) = settings(&[]).resolve(&addresses, &[2]);
        assert_eq!(
            context.nodeport_addresses,
            [ip("198.18.0.2"), ip("2001:db8:18::2"), ip("2001:db8:18::3")]
        );
        assert_eq!(config.v4.snat_addr, [198, 18, 0, 2]);
        assert_eq!(
            IpAddr::from(config.v6.snat_addr),
            ip("2001:db8:18::2"),
            "the uplink's first IPv6 address"
        );
        assert_eq!(config.v6.snat_port_first, 61000);
        assert_eq!(
            config.snat_addresses(),
            [ip("198.18.0.2"), ip("2001:db8:18::2")]
        );

        let mut given = settings(&["2001:db8:20::/64"]);
        given.snat_addresses = vec![ip("2001:db8:20::1")];
        let (context, config) = given.resolve(&addresses, &[2]);
        assert_eq!(context.nodeport_addresses, [ip("2001:db8:20::1")]);
        assert_eq!(IpAddr::from(config.v6.snat_addr), ip("2001:db8:20::1"));
        assert_eq!(
            config.v4.snat_addr,
            [198, 18, 0, 2],
            "IPv4 keeps its default"
        );
    }

    #[test]
    fn nodeport_cidrs_select_any_local_address() {
        let (context, _) = settings(&["198.18.0.0/16", "127.0.0.0/8"]).resolve(&ADDRESSES, &[2]);
        assert_eq!(
            context.nodeport_addresses,
            [ip("127.0.0.1"), ip("198.18.0.2"), ip("198.18.20.1")]
        );
    }

    #[test]
    fn a_local_redirect_is_in_force_while_its_address_is_on_the_node() {
        let (context, _) = settings(&[]).resolve(&ADDRESSES, &[2]);
        let kube_dns = crate::model::ServiceName {
            namespace: "kube-system".into(),
            name: "kube-dns".into(),
        };
        assert_eq!(
            context.local_redirects,
            [((kube_dns, 53), Ipv4Addr::new(198, 18, 20, 1))].into()
        );
    }

    #[test]
    fn without_an_external_address_nothing_is_snated() {
        let (context, config) = settings(&[]).resolve(&ADDRESSES, &[]);
        assert!(context.nodeport_addresses.is_empty());
        assert_eq!(config.v4.snat_addr, [0; 4]);
        assert!(config.snat_addresses().is_empty());
    }

    #[test]
    fn port_ranges_parse_or_say_why_not() {
        assert_eq!(parse_port_range("61000-65535"), Ok(61000..=65535));
        assert!(parse_port_range("65535-61000")
            .unwrap_err()
            .contains("above"));
        assert!(parse_port_range("0-10").unwrap_err().contains("not a port"));
        assert!(parse_port_range("61000")
            .unwrap_err()
            .contains("FIRST-LAST"));
    }
}
