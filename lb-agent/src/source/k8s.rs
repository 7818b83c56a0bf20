//! API-server source: watches of Services and EndpointSlices with the
//! label selector kube-proxy uses. Each change is reduced to the agent's
//! views and handed to its object store, which tells which Services it
//! touched; the agent recomputes only those. Nothing is applied before both
//! kinds have been listed completely, and a relist (after `410 Expired`)
//! replaces a kind only once complete. Backoff on errors is the watcher's.
//! No full objects are kept (no reflector store): memory is the views'.

use std::{collections::BTreeSet, path::Path, sync::Arc};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Config, Resource,
};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, warn};

use crate::{
    model::ServiceName,
    source::objects::{Objects, Sourced},
    source::rest_client::RestClientMetrics,
    source::store::ObjectStore,
    source::view::{ServiceView, SliceView},
};

/// kube-proxy's selector: skip other proxies' services and headless services.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// A client from `--kubeconfig`, else `KUBECONFIG`/`~/.kube/config`, else the
/// in-cluster service account; `api_server` replaces the address (the
/// credentials stay). Its requests are counted in `metrics`.
pub async fn client(
    kubeconfig: Option<&Path>,
    api_server: Option<&str>,
    metrics: &RestClientMetrics,
) -> anyhow::Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await?,
    };
    if let Some(url) = api_server {
        config.cluster_url = url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme().is_some() && u.host().is_some())
            .ok_or_else(|| anyhow::anyhow!("--api-server {url:?}: expected https://HOST:PORT"))?;
    }
    let host = config
        .cluster_url
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&metrics.layer(host))
        .build())
}

/// Every Service and EndpointSlice of `namespace` (all namespaces with
/// `None`), headless and ExternalName ones included: what `explain` needs
/// to answer names the datapath does not hold. Other proxies' Services are
/// left out, as the agent leaves them.
pub async fn list_objects(client: Client, namespace: Option<&str>) -> anyhow::Result<Objects> {
    let params =
        kube::api::ListParams::default().labels("!service.kubernetes.io/service-proxy-name");
    let (services, slices): (Api<Service>, Api<EndpointSlice>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let services = services.list(&params).await.context("listing Services")?;
    let slices = slices
        .list(&kube::api::ListParams::default())
        .await
        .context("listing EndpointSlices")?;
    Ok(Objects {
        services: services
            .iter()
            .map(|s| sourced(ServiceView::from(s)))
            .collect(),
        slices: slices.iter().map(|s| sourced(SliceView::from(s))).collect(),
        unparsed: Vec::new(),
    })
}

/// One change seen at the API server, already reduced to the views the
/// agent keeps (no full objects are stored: memory is the views').
#[derive(Debug)]
enum ApiChange {
    Service(ServiceView),
    ServiceDeleted(ServiceView),
    Slice(SliceView),
    SliceDeleted(SliceView),
    /// A complete (re)list: the given objects replace all of that kind.
    Services(Vec<ServiceView>),
    Slices(Vec<SliceView>),
}

/// Watches of Services and EndpointSlices, delivering their changes in order.
pub struct ApiSource {
    changes: mpsc::UnboundedReceiver<ApiChange>,
    /// Trigger times of the slice changes drained since the last take
    /// (only those after the agent started, as kube-proxy counts).
    triggers: Vec<jiff::Timestamp>,
    started: jiff::Timestamp,
    services_listed: bool,
    slices_listed: bool,
}

/// An object from the API server (no file).
fn sourced<T>(object: T) -> Sourced<T> {
    Sourced { file: None, object }
}

impl ApiSource {
    /// Starts both watches on the current runtime; `trigger` is notified on
    /// every change (and every error, so a recovered stream reconciles too).
    pub fn start(client: Client, trigger: Arc<Notify>) -> Self {
        let (tx, changes) = mpsc::unbounded_channel();
        watch(
            Api::<Service>::all(client.clone()),
            tx.clone(),
            trigger.clone(),
            Kind {
                view: |s| ServiceView::from(s),
                applied: ApiChange::Service,
                deleted: ApiChange::ServiceDeleted,
                listed: ApiChange::Services,
            },
        );
        watch(
            Api::<EndpointSlice>::all(client),
            tx,
            trigger,
            Kind {
                view: |s| SliceView::from(s),
                applied: ApiChange::Slice,
                deleted: ApiChange::SliceDeleted,
                listed: ApiChange::Slices,
            },
        );
        Self {
            changes,
            triggers: Vec::new(),
            started: jiff::Timestamp::now(),
            services_listed: false,
            slices_listed: false,
        }
    }

    fn trigger(&mut self, slice: &SliceView) {
        if let Some(t) = slice.trigger_time.filter(|t| *t > self.started) {
            self.triggers.push(t);
        }
    }

    /// The trigger times of the slice changes drained since the last call;
    /// a relist's are not counted (its changes happened while unwatched).
    pub fn take_trigger_times(&mut self) -> Vec<jiff::Timestamp> {
        std::mem::take(&mut self.triggers)
    }

    /// True once both kinds have been listed completely (and drained).
    pub fn is_ready(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// Applies every change received so far to `store`; returns the
    /// Services they touched.
    pub fn drain(&mut self, store: &mut ObjectStore) -> BTreeSet<ServiceName> {
        let mut dirty = BTreeSet::new();
        while let Ok(change) = self.changes.try_recv() {
            match change {
                ApiChange::Service(view) => {
                    dirty.insert(store.upsert_service(sourced(view)));
                }
                ApiChange::ServiceDeleted(view) => {
                    dirty.insert(store.remove_service(&sourced(view)));
                }
                ApiChange::Slice(view) => {
                    self.trigger(&view);
                    dirty.extend(store.upsert_slice(sourced(view)));
                }
                ApiChange::SliceDeleted(view) => {
                    self.trigger(&view);
                    dirty.extend(store.remove_slice(&sourced(view)));
                }
                ApiChange::Services(list) => {
                    self.services_listed = true;
                    dirty.extend(store.replace_services(list.into_iter().map(sourced).collect()));
                }
                ApiChange::Slices(list) => {
                    self.slices_listed = true;
                    dirty.extend(store.replace_slices(list.into_iter().map(sourced).collect()));
                }
            }
        }
        dirty
    }
}

/// How one kind's objects become changes: each object is reduced to its
/// view as it arrives, a relist's too, so no full object outlives its
/// event.
struct Kind<K, V> {
    view: fn(&K) -> V,
    applied: fn(V) -> ApiChange,
    deleted: fn(V) -> ApiChange,
    listed: fn(Vec<V>) -> ApiChange,
}

/// Runs one watch: applies and deletes go out one by one; a (re)list is
/// collected and sent whole when complete, so a partial list never looks
/// like deleted objects.
fn watch<K, V>(
    api: Api<K>,
    tx: mpsc::UnboundedSender<ApiChange>,
    trigger: Arc<Notify>,
    kind: Kind<K, V>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Send
        + serde::de::DeserializeOwned
        + 'static,
    V: Send + 'static,
{
    // Lists from the API server's watch cache (resourceVersion 0), as
    // client-go informers (kube-proxy's) ask: not a paginated walk of etcd.
    let config = watcher::Config::default()
        .labels(PROXY_LABEL_SELECTOR)
        .any_semantic();
    let name = K::kind(&()).into_owned();
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listing: Vec<V> = Vec::new();
        while let Some(event) = stream.next().await {
            let change = match event {
                Ok(watcher::Event::Apply(object)) => Some((kind.applied)((kind.view)(&object))),
                Ok(watcher::Event::Delete(object)) => Some((kind.deleted)((kind.view)(&object))),
                Ok(watcher::Event::Init) => {
                    listing.clear();
                    None
                }
                Ok(watcher::Event::InitApply(object)) => {
                    listing.push((kind.view)(&object));
                    continue; // nothing to apply until the list is complete
                }
                Ok(watcher::Event::InitDone) => {
                    debug!(kind = %name, objects = listing.len(), "list complete");
                    Some((kind.listed)(std::mem::take(&mut listing)))
                }
                Err(e) => {
                    warn!(kind = %name, "watch error (retrying with backoff): {e}");
                    None
                }
            };
            if let Some(change) = change {
                if tx.send(change).is_err() {
                    return; // the agent is gone
                }
            }
            trigger.notify_one();
        }
    });
}
