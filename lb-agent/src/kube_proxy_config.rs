//! kube-proxy's configuration file (`KubeProxyConfiguration`,
//! `kubeproxy.config.k8s.io/v1alpha1`, as kubeadm's `kube-proxy` ConfigMap
//! holds it) for `run --config`. Each field lb supports becomes the flag of
//! the same meaning; flags given on the command line win. An empty value
//! (`""`, `null`, `0s`) means kube-proxy's default, as in kube-proxy. A
//! field lb does not use, set to anything but its empty value, is a
//! warning naming the field and why; a field KubeProxyConfiguration does
//! not have is an error.

use std::path::{Path, PathBuf};

use yaml_serde::Value;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("--config {0}: not YAML: {1}")]
    Yaml(PathBuf, yaml_serde::Error),
    #[error("--config {path}: apiVersion {found:?}: expected {API_VERSION}")]
    ApiVersion { path: PathBuf, found: String },
    #[error("--config {path}: kind {found:?}: expected {KIND}")]
    Kind { path: PathBuf, found: String },
    #[error("--config {path}: {field}: no such field in {KIND} {API_VERSION}")]
    UnknownField { path: PathBuf, field: String },
    #[error("--config {path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

/// The flags a configuration file stands for, and what it set that lb
/// does not use.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConfigFlags {
    /// `(flag, value)`, `value` empty for a switch.
    pub flags: Vec<(&'static str, String)>,
    pub warnings: Vec<String>,
}

/// Why lb leaves a field alone.
const NOT_USED: &[(&str, &str)] = &[
    ("mode", "lb is the proxy: kube-proxy's modes do not apply"),
    ("iptables", "lb writes no iptables rules"),
    ("ipvs", "lb uses no IPVS"),
    ("nftables", "lb writes no nftables rules"),
    ("winkernel", "Windows only"),
    ("bindAddress", "the node's addresses come from its interfaces"),
    (
        "detectLocal",
        "this node's pods are told by the interface they arrive on, whatever its name",
    ),
    ("configSyncPeriod", "lb watches without a resync period"),
    ("oomScoreAdj", "set it in the pod's spec"),
    ("portRange", "not used by kube-proxy's current modes either"),
    ("enableProfiling", "no profiling endpoints"),
    ("showHiddenMetricsForVersion", "no hidden metrics"),
    ("featureGates", "lb has no kube-proxy feature gates"),
    ("logging", "use RUST_LOG and --log-format"),
    ("clientConnection.acceptContentTypes", "the client negotiates JSON"),
    ("clientConnection.contentType", "the client sends JSON"),
    ("clientConnection.qps", "watches only: no client-side rate limit"),
    ("clientConnection.burst", "watches only: no client-side rate limit"),
    (
        "conntrack.udpTimeout",
        "netfilter's timeout of unreplied UDP is left as is (lb's own table: --conntrack-udp-timeout)",
    ),
];

/// Fields read into flags: `(field, flag, kind)`.
const USED: &[(&str, &str, Kind)] = &[
    ("clientConnection.kubeconfig", "--kubeconfig", Kind::Text),
    ("hostnameOverride", "--node-name", Kind::Text),
    (
        "healthzBindAddress",
        "--healthz-bind-address",
        Kind::Address(10256),
    ),
    (
        "metricsBindAddress",
        "--metrics-bind-address",
        Kind::Address(10249),
    ),
    (
        "bindAddressHardFail",
        "--bind-address-hard-fail",
        Kind::Switch,
    ),
    ("nodePortAddresses", "--nodeport-addresses", Kind::Cidrs),
    ("clusterCIDR", "--cluster-cidr", Kind::CidrText),
    (
        "detectLocalMode",
        "--detect-local-mode",
        Kind::OneOf(&[
            "ClusterCIDR",
            "NodeCIDR",
            "BridgeInterface",
            "InterfaceNamePrefix",
        ]),
    ),
    (
        "conntrack.maxPerCore",
        "--conntrack-max-per-core",
        Kind::Count,
    ),
    ("conntrack.min", "--conntrack-min", Kind::Count),
    (
        "conntrack.tcpEstablishedTimeout",
        "--conntrack-tcp-timeout-established",
        Kind::Duration,
    ),
    (
        "conntrack.tcpCloseWaitTimeout",
        "--conntrack-tcp-timeout-close-wait",
        Kind::Duration,
    ),
    (
        "conntrack.tcpBeLiberal",
        "--conntrack-tcp-be-liberal",
        Kind::Switch,
    ),
    (
        "conntrack.udpStreamTimeout",
        "--conntrack-udp-timeout-stream",
        Kind::Duration,
    ),
];

/// Defaults kube-proxy gives the fields it reads when they are empty, where
/// lb's own default differs.
const KUBE_PROXY_DEFAULTS: &[(&str, &str)] = &[("--healthz-bind-address", "0.0.0.0:10256")];

#[derive(Clone, Copy, Debug)]
enum Kind {
    Text,
    /// `IP:PORT`, or `IP` with kube-proxy's default port.
    Address(u16),
    Switch,
    Cidrs,
    /// CIDRs in one comma-separated string (`clusterCIDR`).
    CidrText,
    OneOf(&'static [&'static str]),
    Count,
    Duration,
}

/// Reads `path`.
pub fn read(path: &Path) -> Result<ConfigFlags, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
    parse(&text, path)
}

/// The flags `text` (the file at `path`) stands for.
pub fn parse(text: &str, path: &Path) -> Result<ConfigFlags, ConfigError> {
    let doc: Value = yaml_serde::from_str(text).map_err(|e| ConfigError::Yaml(path.into(), e))?;
    let invalid = |field: &str, reason: String| ConfigError::Invalid {
        path: path.into(),
        field: field.to_owned(),
        reason,
    };
    let Value::Mapping(top) = &doc else {
        return Err(invalid("(document)", "expected a mapping".into()));
    };
    let text_of = |key: &str| {
        top.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    if text_of("apiVersion") != API_VERSION {
        return Err(ConfigError::ApiVersion {
            path: path.into(),
            found: text_of("apiVersion"),
        });
    }
    if text_of("kind") != KIND {
        return Err(ConfigError::Kind {
            path: path.into(),
            found: text_of("kind"),
        });
    }
    let mut fields = Vec::new();
    leaves(&doc, "", &mut fields);
    let mut config = ConfigFlags::default();
    for (field, value) in &fields {
        if field == "apiVersion" || field == "kind" {
            continue;
        }
        if let Some((_, flag, kind)) = USED.iter().find(|(f, ..)| f == field) {
            if let Some(value) = flag_value(*kind, value).map_err(|r| invalid(field, r))? {
                config.flags.push((flag, value));
            }
            if let (Kind::CidrText, Value::String(text)) = (kind, value) {
                for v6 in text.split(',').map(str::trim).filter(|t| t.contains(':')) {
                    config.warnings.push(format!(
                        "{field}: {v6}: not used by lb: IPv6 is not supported yet"
                    ));
                }
            }
            continue;
        }
        let not_used = NOT_USED
            .iter()
            .find(|(f, _)| field == f || field.starts_with(&format!("{f}.")));
        match not_used {
            Some((_, why)) if !is_empty(value) => config
                .warnings
                .push(format!("{field}: {}: not used by lb: {why}", show(value))),
            Some(_) => {}
            None if is_known_container(field) => {}
            None => {
                return Err(ConfigError::UnknownField {
                    path: path.into(),
                    field: field.clone(),
                })
            }
        }
    }
    for (flag, value) in KUBE_PROXY_DEFAULTS {
        if !config.flags.iter().any(|(f, _)| f == flag) {
            config.flags.push((flag, (*value).to_owned()));
        }
    }
    Ok(config)
}

/// `clientConnection` and `conntrack` themselves, empty or null.
fn is_known_container(field: &str) -> bool {
    matches!(field, "clientConnection" | "conntrack")
}

/// Every field as a dotted path to a scalar or list (lists are values),
/// descending into the mappings of the known containers only: the
/// unsupported sections are judged whole.
fn leaves(value: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Mapping(map) if prefix.is_empty() || is_known_container(prefix) => {
            for (key, value) in map {
                let key = key.as_str().map(str::to_owned).unwrap_or_else(|| show(key));
                let path = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(value, &path, out);
            }
        }
        _ => out.push((prefix.to_owned(), value.clone())),
    }
}

/// `null`, `""`, `false`, `0`, `0s`, and containers of only those: what a
/// generated configuration writes for "kube-proxy's default".
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || crate::duration::parse(s).is_ok_and(|d| d.is_zero()),
        Value::Sequence(items) => items.iter().all(is_empty),
        Value::Mapping(map) => map.values().all(is_empty),
        Value::Tagged(t) => is_empty(&t.value),
    }
}

fn show(value: &Value) -> String {
    yaml_serde::to_string(value)
        .map(|s| s.trim().replace('\n', ", "))
        .unwrap_or_default()
}

/// The flag's value for `value`; `None`: empty, kube-proxy's default.
fn flag_value(kind: Kind, value: &Value) -> Result<Option<String>, String> {
    if is_empty(value) && !matches!(kind, Kind::Count) || matches!(value, Value::Null) {
        return Ok(None);
    }
    match (kind, value) {
        (Kind::Text, Value::String(s)) => Ok(Some(s.clone())),
        (Kind::Switch, Value::Bool(true)) => Ok(Some(String::new())),
        (Kind::Count, Value::Number(n)) => n
            .as_u64()
            .map(|n| Some(n.to_string()))
            .ok_or_else(|| format!("{n}: expected a count, 0 or more")),
        (Kind::Duration, Value::String(s)) => crate::duration::parse(s)
            .map(|d| Some(format!("{}s", d.as_secs())))
            .map_err(|e| e.to_string()),
        (Kind::Address(port), Value::String(s)) => {
            if s.parse::<std::net::SocketAddr>().is_ok() {
                Ok(Some(s.clone()))
            } else if let Ok(ip) = s.parse::<std::net::IpAddr>() {
                Ok(Some(std::net::SocketAddr::new(ip, port).to_string()))
            } else {
                Err(format!("{s:?}: expected IP or IP:PORT"))
            }
        }
        (Kind::Cidrs, Value::Sequence(items)) => {
            if items.iter().any(|i| i.as_str() == Some("primary")) {
                return Err("\"primary\" is not supported: list the CIDRs".into());
            }
            any_cidrs(items.iter().map(|i| i.as_str().unwrap_or_default()))
        }
        // A dual-stack cluster's IPv6 prefix is warned about (above), not
        // an error: the IPv4 one still applies.
        (Kind::CidrText, Value::String(s)) => {
            any_cidrs(s.split(',').map(str::trim).filter(|t| !t.contains(':')))
        }
        (Kind::OneOf(choices), Value::String(s)) if choices.contains(&s.as_str()) => {
            Ok(Some(s.clone()))
        }
        (Kind::OneOf(choices), Value::String(s)) => {
            Err(format!("{s:?}: expected one of {}", choices.join(", ")))
        }
        (_, other) => Err(format!("{}: not the expected type", show(other))),
    }
}

/// CIDRs of either family, comma-joined as the flags take them.
fn any_cidrs<'a>(texts: impl Iterator<Item = &'a str>) -> Result<Option<String>, String> {
    let mut cidrs = Vec::new();
    for text in texts {
        let net: ipnet::IpNet = text
            .parse()
            .map_err(|_| format!("{text:?}: expected a CIDR"))?;
        cidrs.push(net.to_string());
    }
    Ok((!cidrs.is_empty()).then(|| cidrs.join(",")))
}

/// The command line with the file's flags inserted after `run`, but for
/// flags the command line gives itself (it wins). `given(flag)` says
/// whether the command line has `flag` (under any of its names).
pub fn merge(
    args: Vec<std::ffi::OsString>,
    config: &ConfigFlags,
    given: impl Fn(&str) -> bool,
) -> Vec<std::ffi::OsString> {
    let Some(run) = args.iter().position(|a| a == "run") else {
        return args;
    };
    let mut merged: Vec<std::ffi::OsString> = args[..=run].to_vec();
    for (flag, value) in &config.flags {
        if given(flag) {
            continue;
        }
        merged.push(if value.is_empty() {
            (*flag).into()
        } else {
            format!("{flag}={value}").into()
        });
    }
    merged.extend_from_slice(&args[run + 1..]);
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kubeadm's generated config.conf, with a few fields set.
    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 198.18.64.0/18
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: 262144
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: 12h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: true
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: [198.18.0.0/24]
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn kubeadms_config_becomes_flags_and_names_what_lb_does_not_use() {
        let config = parse(KUBEADM, Path::new("config.conf")).unwrap();
        assert_eq!(
            config.flags,
            [
                (
                    "--kubeconfig",
                    "/var/lib/kube-proxy/kubeconfig.conf".to_owned()
                ),
                ("--cluster-cidr", "198.18.64.0/18".to_owned()),
                ("--conntrack-min", "262144".to_owned()),
                ("--conntrack-tcp-timeout-established", "43200s".to_owned()),
                ("--metrics-bind-address", "127.0.0.1:10249".to_owned()),
                ("--nodeport-addresses", "198.18.0.0/24".to_owned()),
                ("--healthz-bind-address", "0.0.0.0:10256".to_owned()),
            ]
        );
        assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
        assert!(config.warnings[0].starts_with("bindAddress: 0.0.0.0: not used by lb"));
        assert!(
            config.warnings[1].starts_with("iptables: "),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn unknown_fields_wrong_kinds_and_bad_values_are_errors_naming_the_field() {
        let file = Path::new("c.yaml");
        let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        let error = |body: &str| {
            parse(&format!("{head}{body}"), file)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error("healthzBindAdress: 0.0.0.0:10256\n"),
            "--config c.yaml: healthzBindAdress: no such field in KubeProxyConfiguration kubeproxy.config.k8s.io/v1alpha1"
        );
        assert_eq!(
            error("conntrack: {tcpEstablishedTimeout: 24}\n"),
            "--config c.yaml: conntrack.tcpEstablishedTimeout: 24: not the expected type"
        );
        assert!(error("conntrack: {tcpCloseWaitTimeout: 1d}\n").contains("unknown unit"));
        let both = parse(
            &format!("{head}nodePortAddresses: [198.18.0.0/24, 2001:db8::/64]\n"),
            file,
        )
        .unwrap();
        assert_eq!(
            both.flags[0],
            (
                "--nodeport-addresses",
                "198.18.0.0/24,2001:db8::/64".to_owned()
            )
        );
        assert!(error("metricsBindAddress: localhost\n").contains("expected IP or IP:PORT"));
        let dual = parse(
            &format!("{head}clusterCIDR: 198.18.64.0/18,2001:db8::/48\n"),
            file,
        )
        .unwrap();
        assert_eq!(
            dual.flags[0],
            ("--cluster-cidr", "198.18.64.0/18".to_owned())
        );
        assert_eq!(
            dual.warnings,
            ["clusterCIDR: 2001:db8::/48: not used by lb: IPv6 is not supported yet"]
        );
        assert!(error("clusterCIDR: 198.18.64.0/33\n").contains("expected a CIDR"));
        assert_eq!(
            error("detectLocalMode: ClusterCidr\n"),
            "--config c.yaml: detectLocalMode: \"ClusterCidr\": expected one of \
             ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix"
        );
        let wrong = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n",
            file,
        );
        assert!(matches!(wrong, Err(ConfigError::ApiVersion { .. })));
    }

    #[test]
    fn the_command_line_wins() {
        let config = ConfigFlags {
            flags: vec![
                ("--node-name", "from-file".into()),
                ("--bind-address-hard-fail", String::new()),
            ],
            warnings: vec![],
        };
        let args: Vec<std::ffi::OsString> = ["lb-agent", "run", "--node-name", "n1"]
            .into_iter()
            .map(Into::into)
            .collect();
        let merged = merge(args, &config, |f| f == "--node-name");
        assert_eq!(
            merged,
            [
                "lb-agent",
                "run",
                "--bind-address-hard-fail",
                "--node-name",
                "n1"
            ]
        );
    }
}
