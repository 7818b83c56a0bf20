//! kube-proxy's state on this node, found from the kernel: the chains of
//! its iptables mode (in the nftables tables of iptables-nft), the table of
//! its nftables mode, the dummy device of its IPVS mode. While kube-proxy
//! runs beside the agent (a migration) they are expected; once it is gone
//! they are leftovers that `kube-proxy --cleanup` removes. A leftover rule
//! still matches traffic to a Service VIP that netfilter sees — node
//! processes' connections (OUTPUT) to Services that have since changed or
//! gone — so the agent reports them (`lb_kube_proxy_rules{mode}`, a log
//! line when they change). Legacy iptables is read through the x_tables
//! sockopt ABI (`iptables_legacy`).

use netlink_packet_core::{NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_netfilter::{
    nftables::{ChainAttribute, ChainMessage, NfTablesMessage, TableAttribute, TableMessage},
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::netlink;

/// The table kube-proxy's nftables mode creates, in the ip and ip6 families.
const NFTABLES_TABLE: &str = "kube-proxy";
/// The dummy device kube-proxy's IPVS mode puts its virtual addresses on.
const IPVS_DEVICE: &str = "kube-ipvs0";

/// What kube-proxy left on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Chains of the iptables mode (also the IPVS mode's) in iptables-nft's
    /// tables, as `FAMILY TABLE/CHAIN`.
    pub iptables_chains: Vec<String>,
    /// The same in legacy iptables (`iptables-legacy`).
    pub legacy_chains: Vec<String>,
    /// Tables of the nftables mode, as `FAMILY TABLE`.
    pub nftables_tables: Vec<String>,
    /// The IPVS mode's device is there.
    pub ipvs_device: bool,
}

impl Found {
    pub fn is_empty(&self) -> bool {
        self.iptables_chains.is_empty()
            && self.legacy_chains.is_empty()
            && self.nftables_tables.is_empty()
            && !self.ipvs_device
    }

    /// One line: how much of each mode, for the log.
    pub fn summary(&self) -> String {
        format!(
            "iptables: {} chains, legacy iptables: {} chains, nftables: {} tables, IPVS device: {}",
            self.iptables_chains.len(),
            self.legacy_chains.len(),
            self.nftables_tables.len(),
            if self.ipvs_device { "yes" } else { "no" }
        )
    }
}

/// Whether a chain is one only kube-proxy makes. The kubelet's own chains
/// (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, and in older releases
/// `KUBE-MARK-MASQ`, `KUBE-POSTROUTING`) stay out: they are not leftovers.
pub fn is_kube_proxy_chain(name: &str) -> bool {
    const CHAINS: [&str; 6] = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
    ];
    const PREFIXES: [&str; 6] = [
        "KUBE-SVC-",
        "KUBE-SEP-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SVL-",
        "KUBE-XLB-",
    ];
    CHAINS.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Looks at this network namespace's netfilter state and devices.
pub fn find() -> std::io::Result<Found> {
    let mut found = Found::default();
    for (family, table) in dump(NfTablesMessage::GetTable(TableMessage {
        attributes: vec![],
    }))?
    .into_iter()
    .filter_map(|(family, message)| match message {
        NfTablesMessage::NewTable(t) => table_name(&t).map(|n| (family, n)),
        _ => None,
    }) {
        if table == NFTABLES_TABLE && matches!(family, Family::Ip | Family::Ip6) {
            found
                .nftables_tables
                .push(format!("{} {table}", family.name()));
        }
    }
    for (family, message) in dump(NfTablesMessage::GetChain(ChainMessage {
        attributes: vec![],
    }))? {
        let NfTablesMessage::NewChain(chain) = message else {
            continue;
        };
        let (table, name) = chain_names(&chain);
        // iptables-nft keeps iptables' tables as nftables tables of the
        // same names; kube-proxy's nftables mode has its own table.
        if matches!(family, Family::Ip | Family::Ip6)
            && table.as_deref() != Some(NFTABLES_TABLE)
            && name.as_deref().is_some_and(is_kube_proxy_chain)
        {
            found.iptables_chains.push(format!(
                "{} {}/{}",
                family.name(),
                table.unwrap_or_default(),
                name.unwrap_or_default()
            ));
        }
    }
    found.legacy_chains = super::iptables_legacy::chains(is_kube_proxy_chain)?;
    found.iptables_chains.sort();
    found.nftables_tables.sort();
    found.ipvs_device = crate::datapath::attach::interfaces()?
        .iter()
        .any(|(name, _)| name == IPVS_DEVICE);
    Ok(found)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Ip,
    Ip6,
    Other,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Other => "other",
        }
    }
}

fn table_name(table: &TableMessage) -> Option<String> {
    table.attributes.iter().find_map(|a| match a {
        TableAttribute::Name(name) => Some(name.clone()),
        _ => None,
    })
}

fn chain_names(chain: &ChainMessage) -> (Option<String>, Option<String>) {
    let mut names = (None, None);
    for a in &chain.attributes {
        match a {
            ChainAttribute::Table(t) => names.0 = Some(t.clone()),
            ChainAttribute::Name(n) => names.1 = Some(n.clone()),
            _ => {}
        }
    }
    names
}

/// An nftables dump over every family: each object with its family. A
/// kernel without nf_tables has nothing to find.
fn dump(request: NfTablesMessage) -> std::io::Result<Vec<(Family, NfTablesMessage)>> {
    let socket = netlink::connect(NETLINK_NETFILTER)?;
    let message = NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
        request,
    );
    netlink::send(&socket, NLM_F_REQUEST | NLM_F_DUMP, message)?;
    let mut objects = Vec::new();
    let mut error = None;
    netlink::receive(
        &socket,
        |payload: NetlinkPayload<NetfilterMessage>| match payload {
            NetlinkPayload::InnerMessage(NetfilterMessage {
                header,
                inner: NetfilterMessageInner::NfTables(message),
                ..
            }) => {
                let family = match header.family {
                    NetfilterProtoFamily::IPv4 => Family::Ip,
                    NetfilterProtoFamily::IPv6 => Family::Ip6,
                    _ => Family::Other,
                };
                objects.push((family, message));
            }
            NetlinkPayload::Error(e) if e.code.is_some() => error = Some(e.to_io()),
            _ => {}
        },
    )?;
    match error {
        Some(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(Vec::new()),
        Some(e) => Err(e),
        None => Ok(objects),
    }
}

#[cfg(test)]
mod tests {
    use super::is_kube_proxy_chain;

    #[test]
    fn kube_proxys_chains_not_the_kubelets() {
        for chain in [
            "KUBE-SERVICES",
            "KUBE-SVC-ERIFXISQEP7F7OF4",
            "KUBE-SEP-ABC",
            "KUBE-PROXY-CANARY",
        ] {
            assert!(is_kube_proxy_chain(chain), "{chain}");
        }
        for chain in [
            "KUBE-FIREWALL",
            "KUBE-KUBELET-CANARY",
            "KUBE-MARK-MASQ",
            "KUBE-POSTROUTING",
            "INPUT",
        ] {
            assert!(!is_kube_proxy_chain(chain), "{chain}");
        }
    }
}
