//! `/healthz`, `/readyz` and `/livez` with kube-proxy's meaning, served by
//! axum.
//!
//! - `/readyz`: 200 once the datapath was programmed from a complete view
//!   of the source, 503 before.
//! - `/healthz`: like `/readyz`, and also 503 while a change seen at the
//!   source has waited longer than the timeout for a successful map update
//!   (kube-proxy: a queued change older than its health timeout), and
//!   while the node is being deleted or is tainted for deletion (KEP-3836:
//!   load balancers drain it first). The body is JSON: `lastUpdated`,
//!   `currentTime`, `pendingSince` if any, `nodeEligible`.
//!   For load balancers and operators: a node whose datapath lags or goes.
//! - `/livez`: 200 whenever the agent answers (KEP-3836's split). For the
//!   liveness probe: a map that is full or a change that does not fit makes
//!   `/healthz` fail on every node at once, and restarting the agent would
//!   not fix it — a liveness probe on `/healthz` would crash-loop every
//!   agent. A wedged agent does not answer at all, and fails this too.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use serde_json::json;

#[derive(Default)]
struct Status {
    /// Wall-clock time of the last successful sync (for the body).
    last_updated: Option<jiff::Timestamp>,
    /// The oldest change seen since the last successful sync.
    pending_since: Option<(Instant, jiff::Timestamp)>,
    /// Why this node is being drained (KEP-3836), if it is.
    draining: Option<crate::source::node::Draining>,
}

/// Shared between the agent loop (writer) and the HTTP handlers.
pub struct Health {
    status: Mutex<Status>,
    timeout: Duration,
}

impl Health {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            status: Mutex::new(Status::default()),
            timeout,
        })
    }

    /// A change at the source (watch event, edited file) awaits a sync.
    pub fn change_seen(&self) {
        let mut s = self.lock();
        if s.pending_since.is_none() {
            s.pending_since = Some((Instant::now(), jiff::Timestamp::now()));
        }
    }

    /// Everything seen so far is in the maps.
    pub fn synced(&self) {
        let mut s = self.lock();
        s.last_updated = Some(jiff::Timestamp::now());
        s.pending_since = None;
    }

    /// The node is (`Some`) or is no longer (`None`) being drained.
    pub fn set_draining(&self, draining: Option<crate::source::node::Draining>) {
        self.lock().draining = draining;
    }

    pub fn is_ready(&self) -> bool {
        self.lock().last_updated.is_some()
    }

    pub fn is_healthy(&self) -> bool {
        let s = self.lock();
        s.last_updated.is_some()
            && s.draining.is_none()
            && s.pending_since
                .is_none_or(|(since, _)| since.elapsed() <= self.timeout)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        // A poisoned lock only means a panic elsewhere; the data is plain.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn body(&self) -> serde_json::Value {
        let s = self.lock();
        json!({
            "lastUpdated": s.last_updated.map(|t| t.to_string()),
            "currentTime": jiff::Timestamp::now().to_string(),
            "pendingSince": s.pending_since.map(|(_, t)| t.to_string()),
            // kube-proxy's field: false while the node is being drained.
            "nodeEligible": s.draining.is_none(),
        })
    }
}

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/livez", get(livez))
        .with_state(health)
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    respond(health.is_healthy(), &health)
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    respond(health.is_ready(), &health)
}

async fn livez(State(health): State<Arc<Health>>) -> impl IntoResponse {
    respond(true, &health)
}

fn respond(ok: bool, health: &Health) -> impl IntoResponse {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(health.body()))
}

/// Serves until the task is dropped (axum backs off on accept errors).
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) {
    if let Err(e) = axum::serve(listener, router(health)).await {
        tracing::error!("health server: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_after_a_sync_until_a_change_waits_too_long() {
        let h = Health::new(Duration::from_millis(500));
        assert!(!h.is_ready() && !h.is_healthy(), "nothing synced yet");
        h.synced();
        assert!(h.is_ready() && h.is_healthy());
        h.change_seen();
        assert!(h.is_healthy(), "a fresh change is normal");
        std::thread::sleep(Duration::from_millis(550));
        assert!(!h.is_healthy(), "a change stuck past the timeout");
        assert!(h.is_ready(), "still ready: it did sync once");
        h.synced();
        assert!(h.is_healthy());
        assert!(h.body()["pendingSince"].is_null());
    }
}
