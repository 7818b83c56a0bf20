//! Where the agent's input comes from and how it is kept: Kubernetes
//! objects read from manifest files (`manifest`, re-read on `watch` events)
//! or watched at the API server (`k8s`), slimmed to the fields the datapath
//! depends on (`view`), grouped per Service (`store`) and handed to a pass as
//! `objects`. `rest_client` counts the API client's requests; `node`
//! watches this node's Node object (for `/healthz`).

pub mod k8s;
pub mod manifest;
pub mod node;
pub mod objects;
pub mod rest_client;
pub mod store;
pub mod view;
pub mod watch;
