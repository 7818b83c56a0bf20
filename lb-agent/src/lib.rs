//! lb-agent: programs the eBPF service load balancer from Kubernetes objects.
//!
//! manifests (`manifest`) → desired frontends (`desired`) → ordered map writes
//! (`reconcile`) → the kernel (`datapath`). `dump` renders the maps for
//! operators and golden tests.

pub mod datapath;
pub mod desired;

pub mod dump;
pub mod error;
pub mod explain;
pub mod health;
pub mod ids;
pub mod inspect;
pub mod k8s;
pub mod maglev;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod node;
pub mod objects;
pub mod reconcile;
pub mod run;
pub mod service_health;
pub mod store;
pub mod view;
pub mod watch;
