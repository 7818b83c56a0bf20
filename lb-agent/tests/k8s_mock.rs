//! Fault cases a real API server won't produce on demand, with kube-rs's
//! `tower-test` mock: 500s on list, a malformed object in a watch, a dropped
//! watch stream. The source must never report ready before complete lists,
//! skip what it cannot decode, resume after drops, and never panic.

use std::{sync::Arc, time::Duration};

use http::{Request, Response, StatusCode};
use kube::{client::Body, Client};
use lb_agent::source::k8s::ApiSource;
use serde_json::json;
use tokio::sync::{oneshot, Notify};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn service(name: &str, rv: &str, port: i64) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "t", "resourceVersion": rv},
           "spec": {"clusterIP": "198.19.0.1", "ports": [{"port": port}]}})
}

fn respond(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(body.into_bytes()))
        .unwrap()
}

fn list(kind: &str, rv: &str, items: Vec<serde_json::Value>) -> String {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv}, "items": items})
        .to_string()
}

fn event(kind: &str, object: serde_json::Value) -> String {
    format!("{}\n", json!({"type": kind, "object": object}))
}

/// Held by the server before it answers the first good list of Services:
/// it says `reached`, then waits for `go`.
struct Gate {
    reached: oneshot::Sender<()>,
    go: oneshot::Receiver<()>,
}

/// Scripted API server: what each request gets, in order of arrival per resource.
async fn serve(mut handle: Handle, log: Arc<std::sync::Mutex<Vec<String>>>, gate: Gate) {
    let mut gate = Some(gate);
    let mut service_requests = 0;
    let mut parked = Vec::new(); // watches left open
    while let Some((request, send)) = handle.next_request().await {
        let uri = request.uri().to_string();
        log.lock().unwrap().push(uri.clone());
        let watching = uri.contains("watch=true");
        if uri.contains("endpointslices") {
            if watching {
                parked.push(send);
            } else {
                send.send_response(respond(
                    StatusCode::OK,
                    list("EndpointSliceList", "1", vec![]),
                ));
            }
            continue;
        }
        service_requests += 1;
        match (service_requests, watching) {
            // The first list fails: the source must not become ready on it.
            (1, false) => send.send_response(respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd unavailable", "code": 500}).to_string(),
            )),
            (_, false) => {
                let answer = respond(StatusCode::OK, list("ServiceList", "10", vec![service("a", "10", 80)]));
                match gate.take() {
                    Some(gate) => {
                        tokio::spawn(async move {
                            let _ = gate.reached.send(());
                            let _ = gate.go.await;
                            send.send_response(answer);
                        });
                    }
                    None => send.send_response(answer),
                }
            }
            // First watch: a malformed object, then a good change, then the stream drops.
            (3, true) => {
                let bad = json!({"apiVersion": "v1", "kind": "Service",
                                 "metadata": {"name": "bad", "namespace": "t", "resourceVersion": "11"},
                                 "spec": {"ports": "not-a-list"}});
                let body = event("ADDED", bad) + &event("MODIFIED", service("a", "12", 81));
                send.send_response(respond(StatusCode::OK, body));
            }
            // The resumed watch delivers one more change and ends too.
            (4, true) => send.send_response(respond(StatusCode::OK, event("ADDED", service("b", "13", 90)))),
            // Later watches stay open (never answered).
            (_, true) => parked.push(send),
        }
    }
}

#[tokio::test]
async fn survives_errors_malformed_objects_and_dropped_streams() {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (reached_tx, reached) = oneshot::channel();
    let (go, go_rx) = oneshot::channel();
    let gate = Gate {
        reached: reached_tx,
        go: go_rx,
    };
    tokio::spawn(serve(handle, requests.clone(), gate));
    let client = Client::new(mock, "default");
    let trigger = Arc::new(Notify::new());
    let mut source = ApiSource::start(client, trigger.clone());
    let mut store = lb_agent::source::store::ObjectStore::default();

    // Everything before the first good list of Services — the failed list,
    // the slices' list — has been answered; the source must not be ready.
    tokio::time::timeout(Duration::from_secs(30), reached)
        .await
        .expect("the list is retried after the 500")
        .unwrap();
    source.drain(&mut store);
    assert!(
        !source.is_ready(),
        "ready before a complete list of Services"
    );
    go.send(()).unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(200), trigger.notified()).await;
        let uris = requests.lock().unwrap().clone();
        source.drain(&mut store);
        let mut names: Vec<(String, i32)> = store
            .services()
            .map(|s| {
                (
                    s.object.name.to_string(),
                    s.object.spec.as_ref().unwrap().ports[0].port,
                )
            })
            .collect();
        names.sort();
        if names == [("a".to_string(), 81), ("b".to_string(), 90)] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "did not converge; requests: {uris:#?}; services: {names:?}"
        );
    }
    assert!(source.is_ready());
    let uris = requests.lock().unwrap().clone();
    let service_watches = uris
        .iter()
        .filter(|u| u.contains("/services") && u.contains("watch=true"))
        .count();
    assert!(
        service_watches >= 2,
        "the dropped watch was resumed: {uris:#?}"
    );
    assert!(
        uris.iter().all(|u| u.contains("labelSelector=")),
        "kube-proxy's label selector on every request: {uris:#?}"
    );
}
