//! client-go's request metrics for the agent's API client, as the
//! dashboards built for kube-proxy read them: `rest_client_requests_total
//! {code, host, method}` and `rest_client_request_duration_seconds{host,
//! verb}` (until the response's headers: a watch counts once, when it
//! starts). A tower layer on the kube client; the families are registered
//! with the agent's other metrics.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    histogram::{exponential_buckets, Histogram},
};

type RequestLabels = [(&'static str, String); 3];
type DurationLabels = [(&'static str, String); 2];
type Histograms = Family<DurationLabels, Histogram, fn() -> Histogram>;

/// The request counters and latencies; clones share them.
#[derive(Clone, Debug)]
pub struct RestClientMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histograms,
}

impl Default for RestClientMetrics {
    fn default() -> Self {
        // client-go's buckets span 5 ms .. 60 s.
        fn histogram() -> Histogram {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        }
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram as fn() -> Histogram),
        }
    }
}

impl RestClientMetrics {
    /// The layer for a client of the API server at `host` (`HOST:PORT`).
    pub fn layer(&self, host: String) -> RestClientLayer {
        RestClientLayer {
            metrics: self.clone(),
            host,
        }
    }

    fn record(&self, host: &str, method: &str, code: &str, seconds: f64) {
        self.requests
            .get_or_create(&[
                ("code", code.to_owned()),
                ("host", host.to_owned()),
                ("method", method.to_owned()),
            ])
            .inc();
        self.duration
            .get_or_create(&[("host", host.to_owned()), ("verb", method.to_owned())])
            .observe(seconds);
    }
}

#[derive(Clone)]
pub struct RestClientLayer {
    metrics: RestClientMetrics,
    host: String,
}

impl<S> tower::Layer<S> for RestClientLayer {
    type Service = Measured<S>;

    fn layer(&self, inner: S) -> Measured<S> {
        Measured {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Measured<S> {
    inner: S,
    layer: RestClientLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for Measured<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().as_str().to_owned();
        let layer = self.layer.clone();
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            // client-go's code for a request that got no response.
            let code = match &result {
                Ok(response) => response.status().as_u16().to_string(),
                Err(_) => "<error>".to_owned(),
            };
            let seconds = started.elapsed().as_secs_f64();
            layer.metrics.record(&layer.host, &method, &code, seconds);
            result
        })
    }
}
