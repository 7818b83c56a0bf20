//! `healthCheckNodePort` servers, as kube-proxy serves them: for each
//! `externalTrafficPolicy: Local` load balancer, any GET on its port at the
//! node addresses answers 200 while this node has an endpoint of it (and
//! the agent is healthy), 503 otherwise, so the load balancer sends traffic
//! only to nodes that keep it. The body is JSON:
//! `{"service":{"namespace","name"},"localEndpoints":N,"serviceProxyHealthy":B}`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json, Router,
};
use serde_json::json;

use crate::{desired::HealthCheck, model::ServiceName, serve::health::Health};

type Checks = Arc<RwLock<BTreeMap<u16, (ServiceName, usize)>>>;

pub struct ServiceHealthServers {
    checks: Checks,
    proxy: Arc<Health>,
    listeners: BTreeMap<SocketAddr, tokio::task::JoinHandle<()>>,
}

impl ServiceHealthServers {
    pub fn new(proxy: Arc<Health>) -> Self {
        Self {
            checks: Checks::default(),
            proxy,
            listeners: BTreeMap::new(),
        }
    }

    /// Serves `checks` on every address in `addresses` (must run inside the
    /// tokio runtime). Returns the ports that could not be bound.
    pub fn sync(
        &mut self,
        checks: &BTreeMap<ServiceName, HealthCheck>,
        addresses: &[IpAddr],
    ) -> Vec<String> {
        let mut by_port = BTreeMap::new();
        for (name, check) in checks {
            // Two Services on one port cannot both be served; the API
            // server allocates them apart, so keep the first.
            by_port
                .entry(check.port)
                .or_insert((name.clone(), check.local_endpoints));
        }
        let wanted: Vec<SocketAddr> = by_port
            .keys()
            .flat_map(|port| addresses.iter().map(move |a| SocketAddr::from((*a, *port))))
            .collect();
        *self.checks.write().unwrap_or_else(|p| p.into_inner()) = by_port;
        self.listeners.retain(|addr, task| {
            let keep = wanted.contains(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut errors = Vec::new();
        for addr in wanted {
            if self.listeners.contains_key(&addr) {
                continue;
            }
            match bind(addr) {
                Ok(listener) => {
                    let app = Router::new().fallback(answer).with_state((
                        addr.port(),
                        self.checks.clone(),
                        self.proxy.clone(),
                    ));
                    let task = tokio::spawn(async move {
                        if let Err(e) = axum::serve(listener, app).await {
                            tracing::error!(%addr, "health check server: {e}");
                        }
                    });
                    tracing::info!(%addr, "serving a healthCheckNodePort");
                    self.listeners.insert(addr, task);
                }
                Err(e) => errors.push(format!("healthCheckNodePort {addr}: {e}")),
            }
        }
        errors
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

async fn answer(State((port, checks, proxy)): State<(u16, Checks, Arc<Health>)>) -> Response {
    let entry = checks
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&port)
        .cloned();
    let Some((service, local_endpoints)) = entry else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let proxy_healthy = proxy.is_healthy();
    let code = if local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "service": {"namespace": &*service.namespace, "name": &*service.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let mut response = (code, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("X-Load-Balancing-Endpoint-Weight", local_endpoints.into());
    response
}
