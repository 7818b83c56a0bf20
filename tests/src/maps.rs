//! What an agent programmed, read from its pins the way `inspect services
//! --json` reads them, so tests compare fields rather than search text.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use lb_agent::cli::inspect::{self, FrontendInfo};

#[derive(Debug)]
pub struct Maps {
    pub frontends: Vec<FrontendInfo>,
    /// `inspect services` text, for failure messages.
    pub text: String,
}

impl Maps {
    pub fn read(pin_dir: &Path) -> anyhow::Result<Self> {
        let snapshot = inspect::snapshot(pin_dir)?;
        Ok(Self {
            frontends: inspect::frontends(&snapshot, &Default::default()),
            text: inspect::services_text(&snapshot, &Default::default())?,
        })
    }

    /// The frontend named `ADDR:PORT/PROTO` (e.g. `198.19.0.10:80/TCP`).
    pub fn frontend(&self, name: &str) -> Option<&FrontendInfo> {
        self.frontends.iter().find(|f| f.frontend == name)
    }

    /// How many backends the frontend `ADDR:PORT/PROTO` has, if it exists.
    pub fn count(&self, name: &str) -> Option<usize> {
        self.frontend(name).map(|f| f.backends.len())
    }

    /// The frontends on `PORT/PROTO` at any address (a node port is one
    /// frontend per node address).
    pub fn on_port<'a>(&'a self, port_proto: &'a str) -> impl Iterator<Item = &'a FrontendInfo> {
        self.frontends.iter().filter(move |f| {
            f.frontend
                .split_once(':')
                .is_some_and(|(_, p)| p == port_proto)
        })
    }

    /// The backend count every frontend on `PORT/PROTO` has; `None` when
    /// there are none or they differ.
    pub fn port_count(&self, port_proto: &str) -> Option<usize> {
        self.shared(port_proto, |f| f.backends.len())
    }

    /// (backends, of which local) shared by every frontend on `PORT/PROTO`.
    pub fn port_local(&self, port_proto: &str) -> Option<(usize, u16)> {
        self.shared(port_proto, |f| (f.backends.len(), f.local_backends))
    }

    fn shared<T: PartialEq>(&self, port_proto: &str, of: impl Fn(&FrontendInfo) -> T) -> Option<T> {
        let mut values = self.on_port(port_proto).map(of);
        let first = values.next()?;
        values.all(|v| v == first).then_some(first)
    }

    /// Whether there are frontends on `PORT/PROTO` and each satisfies `pred`.
    pub fn port_all(&self, port_proto: &str, pred: impl Fn(&FrontendInfo) -> bool) -> bool {
        let mut frontends = self.on_port(port_proto).peekable();
        frontends.peek().is_some() && frontends.all(pred)
    }

    /// Whether any frontend is at `addr` (any port).
    pub fn has_address(&self, addr: impl Into<IpAddr>) -> bool {
        let addr = addr.into();
        self.frontends.iter().any(|f| f.address == addr)
    }

    /// The IPv4 backend addresses of frontend `name`, in slot order.
    pub fn backends(&self, name: &str) -> Vec<Ipv4Addr> {
        self.all_backends(name)
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// The backend addresses of frontend `name` (either family), in slot order.
    pub fn all_backends(&self, name: &str) -> Vec<IpAddr> {
        self.frontend(name)
            .map(|f| f.backends.iter().filter_map(|b| b.address).collect())
            .unwrap_or_default()
    }
}
