//! Local redirect (`--local-redirect`), for NodeLocal DNSCache: a
//! Service's port at its cluster IPs is served on this node by a listener
//! at a node address (node-local-dns binds 169.254.20.10 on its
//! `nodelocaldns` interface) while that address is on one of the node's
//! interfaces; without it (the cache is not running here), by the
//! Service's own endpoints. kube-proxy gets the same by node-local-dns's
//! NOTRACK rules, which lb's datapath, ahead of netfilter, never sees.

use std::{net::Ipv4Addr, str::FromStr};

use crate::model::ServiceName;

/// `NAMESPACE/NAME:PORT=ADDRESS`: the Service's port `PORT` (TCP and UDP)
/// is served at `ADDRESS:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRedirect {
    pub service: ServiceName,
    pub port: u16,
    pub address: Ipv4Addr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LocalRedirectError {
    #[error(
        "{0:?}: expected NAMESPACE/NAME:PORT=ADDRESS, e.g. kube-system/kube-dns:53=169.254.20.10"
    )]
    Syntax(String),
    #[error("{text:?}: {part:?} is not {what}")]
    Value {
        text: String,
        part: String,
        what: &'static str,
    },
}

impl FromStr for LocalRedirect {
    type Err = LocalRedirectError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || LocalRedirectError::Syntax(text.to_owned());
        let (service, address) = text.split_once('=').ok_or_else(syntax)?;
        let (service, port) = service.rsplit_once(':').ok_or_else(syntax)?;
        let (namespace, name) = service.split_once('/').ok_or_else(syntax)?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(syntax());
        }
        let value = |part: &str, what| LocalRedirectError::Value {
            text: text.to_owned(),
            part: part.to_owned(),
            what,
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| value(port, "a port 1-65535"))?;
        let address = address
            .parse::<Ipv4Addr>()
            .ok()
            .filter(|a| !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast())
            .ok_or_else(|| value(address, "a unicast IPv4 address"))?;
        Ok(Self {
            service: ServiceName {
                namespace: namespace.into(),
                name: name.into(),
            },
            port,
            address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_parse_or_say_what_is_wrong() {
        let r: LocalRedirect = "kube-system/kube-dns:53=169.254.20.10".parse().unwrap();
        assert_eq!(r.service.to_string(), "kube-system/kube-dns");
        assert_eq!((r.port, r.address), (53, Ipv4Addr::new(169, 254, 20, 10)));
        for bad in [
            "kube-dns:53=169.254.20.10",
            "kube-system/kube-dns=169.254.20.10",
            "a/b:53",
        ] {
            assert_eq!(
                bad.parse::<LocalRedirect>(),
                Err(LocalRedirectError::Syntax(bad.into()))
            );
        }
        assert_eq!(
            "a/b:0=169.254.20.10"
                .parse::<LocalRedirect>()
                .unwrap_err()
                .to_string(),
            "\"a/b:0=169.254.20.10\": \"0\" is not a port 1-65535"
        );
        assert!("a/b:53=0.0.0.0"
            .parse::<LocalRedirect>()
            .unwrap_err()
            .to_string()
            .contains("unicast IPv4"));
    }
}
