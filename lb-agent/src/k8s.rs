//! API-server source: reflectors over Services and EndpointSlices with the
//! label selector kube-proxy uses. Events only nudge a trigger; the agent
//! reconciles from the complete stores (level-triggered), never from a lone
//! event, and not before both stores have completed their first list.
//! Relists after `410 Expired` and backoff on errors are the watcher's.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client, Config, Resource,
};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::{
    objects::{Objects, Sourced},
    view::{ServiceView, SliceView},
};

/// kube-proxy's selector: skip other proxies' services and headless services.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// A client from `--kubeconfig`, else `KUBECONFIG`/`~/.kube/config`, else the
/// in-cluster service account; `api_server` replaces the address (the
/// credentials stay).
pub async fn client(kubeconfig: Option<&Path>, api_server: Option<&str>) -> anyhow::Result<Client> {
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
    Ok(Client::try_from(config)?)
}

/// The reflector stores.
pub struct ApiSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    synced: Arc<AtomicBool>,
}

impl ApiSource {
    /// Starts both watches on the current runtime; `trigger` is notified on
    /// every change (and every error, so a recovered stream reconciles too).
    pub fn start(client: Client, trigger: Arc<Notify>) -> Self {
        let services = reflect(Api::<Service>::all(client.clone()), trigger.clone());
        let slices = reflect(Api::<EndpointSlice>::all(client), trigger.clone());
        let synced = Arc::new(AtomicBool::new(false));
        let (s, e, flag) = (services.clone(), slices.clone(), synced.clone());
        tokio::spawn(async move {
            if s.wait_until_ready().await.is_ok() && e.wait_until_ready().await.is_ok() {
                flag.store(true, Ordering::Release);
                trigger.notify_one();
            }
        });
        Self {
            services,
            slices,
            synced,
        }
    }

    /// True once both stores have held a complete list.
    pub fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// A consistent-enough snapshot of both stores for one reconcile.
    pub fn objects(&self) -> Objects {
        Objects {
            services: self
                .services
                .state()
                .iter()
                .map(|s| Sourced {
                    file: None,
                    object: ServiceView::from(s.as_ref()),
                })
                .collect(),
            slices: self
                .slices
                .state()
                .iter()
                .map(|s| Sourced {
                    file: None,
                    object: SliceView::from(s.as_ref()),
                })
                .collect(),
            unparsed: Vec::new(),
        }
    }
}

fn reflect<K>(api: Api<K>, trigger: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
{
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
    // The stores hold every object between passes: drop what the datapath
    // never reads (managed fields and annotations can dwarf the rest).
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|obj: &mut K| {
            obj.meta_mut().managed_fields = None;
            obj.meta_mut().annotations = None;
        })
        .reflect(writer);
    tokio::spawn(drive(stream, K::kind(&()).into_owned(), trigger));
    reader
}

async fn drive<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    kind: String,
    trigger: Arc<Notify>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::InitDone) => debug!(%kind, "list complete"),
            Ok(_) => {}
            Err(e) => warn!(%kind, "watch error (retrying with backoff): {e}"),
        }
        trigger.notify_one();
    }
}
