//! lb-agent: programs the eBPF service load balancer from Kubernetes objects.
//!
//! The path of a Service, one folder a stage:
//!
//! - `source`: Services and EndpointSlices, from manifest files or the API
//!   server, kept per Service;
//! - `desired`: those objects (and this node's addresses) → the frontends
//!   to serve, each with its backends; bad input is an `InputError` naming
//!   the object and field;
//! - `reconcile`: desired frontends → an ordered plan of map writes,
//!   applied so that no packet sees a half-written Service;
//! - `datapath`: the kernel — the embedded eBPF object, pinned maps,
//!   attachment to interfaces and cgroups, conntrack upkeep, migration of
//!   older map layouts;
//! - `serve`: `lb-agent run`, the loop that ties the stages together, and
//!   what it serves (health, metrics, `healthCheckNodePort`s);
//! - `cli`: the read-only operator commands (`inspect`, `explain`).
//!
//! `model` holds the types every stage shares (frontends, addresses,
//! input errors, Maglev tables); `netlink`, a request and its replies over
//! a netlink socket.

/// The source revision the agent was built from (`git describe`; `unknown`
/// outside a git checkout).
pub const REVISION: &str = env!("LB_REVISION");

pub mod cli;
pub mod datapath;
pub mod desired;
pub mod duration;
pub mod kube_proxy_config;
pub mod model;
pub mod netlink;
pub mod reconcile;
pub mod serve;
pub mod source;
