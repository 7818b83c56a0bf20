//! This node's Node object: what KEP-3836 makes `/healthz` say (a node
//! being deleted, or tainted for deletion by the cluster autoscaler, fails
//! `/healthz` so that cloud load balancers drain it before it goes; its
//! connections are not cut: the datapath keeps serving), and its zone for
//! topology hints. Only the one object is watched (a field selector on its
//! name).

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use tokio::sync::watch;
use tracing::warn;

/// The cluster autoscaler's taint on a node it is about to remove.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Why the node should be drained, if it should.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Draining {
    /// `metadata.deletionTimestamp` is set.
    BeingDeleted,
    /// Tainted `ToBeDeletedByClusterAutoscaler`.
    ToBeDeleted,
    /// The Node object is gone.
    Deleted,
}

/// The label that names a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What the Node object says, as last seen (`None` before it was).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Why the node should be drained, if it should.
    pub draining: Option<Draining>,
    pub zone: Option<String>,
}

pub type NodeState = Option<NodeFacts>;

/// Why `node` should be drained (KEP-3836), if it should.
pub fn draining(node: &Node) -> Option<Draining> {
    if node.metadata.deletion_timestamp.is_some() {
        return Some(Draining::BeingDeleted);
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    tainted.then_some(Draining::ToBeDeleted)
}

/// Watches the Node named `name` on the current runtime.
pub fn watch_node(client: Client, name: &str) -> watch::Receiver<NodeState> {
    let (tx, rx) = watch::channel(None);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let api = Api::<Node>::all(client);
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
        while let Some(event) = stream.next().await {
            // A node never seen stays eligible: a name that matches no Node
            // (manifest-made clusters, a misspelt --node-name) must not
            // drain every node from its load balancers.
            let state = match event {
                Ok(watcher::Event::Apply(node)) | Ok(watcher::Event::InitApply(node)) => {
                    Some(NodeFacts {
                        draining: draining(&node),
                        zone: node
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(ZONE_LABEL))
                            .cloned(),
                    })
                }
                Ok(watcher::Event::Delete(_)) => Some(NodeFacts {
                    draining: Some(Draining::Deleted),
                    zone: None,
                }),
                Ok(watcher::Event::Init) | Ok(watcher::Event::InitDone) => None,
                Err(e) => {
                    warn!(node = %name, "Node watch error (retrying with backoff): {e}");
                    None
                }
            };
            if let Some(state) = state {
                tx.send_replace(Some(state));
            }
        }
    });
    rx
}
