//! The service and cluster CIDRs of each family, set by the agent at load
//! (see `lb_common::cidrs`; `Cidrs::contains` reads them volatile).

use lb_common::cidrs::{Cidrs, Cidrs6};

/// `--service-cluster-ip-range`.
#[unsafe(no_mangle)]
pub static SERVICE_CIDRS: Cidrs = Cidrs::NONE;
#[unsafe(no_mangle)]
pub static SERVICE_CIDRS6: Cidrs6 = Cidrs6::NONE;

/// The cluster's pod CIDRs (`--cluster-cidr`); none: every source arriving
/// at an uplink is outside the cluster.
#[unsafe(no_mangle)]
pub static CLUSTER_CIDRS: Cidrs = Cidrs::NONE;
#[unsafe(no_mangle)]
pub static CLUSTER_CIDRS6: Cidrs6 = Cidrs6::NONE;
