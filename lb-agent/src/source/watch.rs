//! Wake-ups for the agent loop, so idle means idle: file changes in the
//! manifest directory (the `notify` crate) and network interfaces appearing
//! or going and addresses changing (rtnetlink events), each nudging a `Notify`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::Notify;

/// Files a watch reported since the last `take`.
#[derive(Debug, Default)]
pub struct ChangedPaths {
    paths: BTreeSet<PathBuf>,
    /// Events were lost or came without paths: scan the whole directory.
    rescan: bool,
}

pub type SharedPaths = Arc<Mutex<ChangedPaths>>;

/// The paths reported so far and whether a full scan is needed; resets.
pub fn take(changed: &SharedPaths) -> (BTreeSet<PathBuf>, bool) {
    let mut c = changed.lock().unwrap_or_else(|p| p.into_inner());
    let taken = std::mem::take(&mut *c);
    (taken.paths, taken.rescan)
}

/// Watches `dir` (not recursively): every event records its paths in
/// `changed` and nudges `wake`. Dropping the watcher stops it.
pub fn watch_dir(
    dir: &Path,
    changed: SharedPaths,
    wake: Arc<Notify>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let mut c = changed.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            // Not reads: the agent's own reads of the directory would wake
            // it again, forever.
            Ok(e) if e.kind.is_access() => return,
            Ok(e) if !e.need_rescan() && !e.paths.is_empty() => c.paths.extend(e.paths),
            _ => c.rescan = true,
        }
        drop(c);
        wake.notify_one();
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Subscribes to link and IPv4 address events (and IPv4 route events with
/// `routes`, for `@uplink`) in this network namespace; each one nudges
/// `wake`. Runs on the current runtime until the socket fails.
pub fn watch_links(wake: Arc<Notify>, routes: bool) -> std::io::Result<()> {
    use rtnetlink::MulticastGroup;
    let groups: &[MulticastGroup] = if routes {
        &[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv4Route,
        ]
    } else {
        &[MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr]
    };
    let (connection, _handle, mut messages) = rtnetlink::new_multicast_connection(groups)?;
    tokio::spawn(connection);
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            wake.notify_one();
        }
        tracing::warn!("link event stream ended; interfaces are rescanned periodically only");
    });
    Ok(())
}

/// The interfaces of the IPv4 default route(s): the node's uplinks.
pub async fn default_route_interfaces() -> std::io::Result<Vec<u32>> {
    use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut routes = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute();
    let mut out = Vec::new();
    while let Some(route) = routes.next().await {
        let route: RouteMessage = route.map_err(std::io::Error::other)?;
        if route.header.destination_prefix_length != 0 {
            continue;
        }
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Oif(index) => out.push(*index),
                RouteAttribute::MultiPath(hops) => {
                    out.extend(hops.iter().map(|hop| hop.interface_index))
                }
                _ => {}
            }
        }
    }
    task.abort();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// What the node's links are, beyond their names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkKinds {
    /// veth devices whose peer is in another network namespace: the host
    /// side of a pod (or container), whatever the CNI calls it (`@pods`).
    pub pod_veths: Vec<u32>,
    /// Devices whose packets carry no Ethernet header (IPIP's tunl0,
    /// WireGuard, TUN): the tc programs parse Ethernet, so these are never
    /// attached, whatever pattern matches them.
    pub not_ethernet: Vec<u32>,
}

/// The link kinds of this network namespace.
pub async fn link_kinds() -> std::io::Result<LinkKinds> {
    use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkLayerType};
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut links = handle.link().get().execute();
    let mut kinds = LinkKinds::default();
    while let Some(link) = links.next().await {
        let link = link.map_err(std::io::Error::other)?;
        let index = link.header.index;
        // Loopback frames carry a (zeroed) Ethernet header too.
        if !matches!(
            link.header.link_layer_type,
            LinkLayerType::Ether | LinkLayerType::Loopback
        ) {
            kinds.not_ethernet.push(index);
            continue;
        }
        let veth = link.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(infos)
                if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
        });
        let peer_elsewhere = link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
        if veth && peer_elsewhere {
            kinds.pod_veths.push(index);
        }
    }
    task.abort();
    Ok(kinds)
}
