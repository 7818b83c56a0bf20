//! kube-proxy-shaped rules for the peers, generated for N services × E
//! endpoints, applied in the node namespace.
//!
//! iptables (kube-proxy's iptables mode, classic xtables): PREROUTING →
//! KUBE-SERVICES, one `-d VIP -p tcp --dport` rule per service, in order
//! (a linear scan on each new connection), → KUBE-SVC-* picking an endpoint
//! with `statistic --mode random --probability 1/(E-j)` → KUBE-SEP-* DNAT.
//!
//! nftables (kube-proxy's nftables mode): a `service-ips` verdict map keyed
//! by address . protocol . port, then `numgen random mod E` into per-endpoint
//! chains that DNAT.
//!
//! Both for either family, as kube-proxy writes them for each (ip6tables,
//! `table ip6 kube-proxy`); the services of one call are of one family.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
};

use super::Service;

pub fn iptables_rules(services: &[Service]) -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    for (i, svc) in services.iter().enumerate() {
        let _ = writeln!(r, ":KUBE-SVC-{i:06} - [0:0]");
        for j in 0..svc.endpoints.len() {
            let _ = writeln!(r, ":KUBE-SEP-{i:06}-{j:02} - [0:0]");
        }
    }
    r.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    r.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    for (i, svc) in services.iter().enumerate() {
        let host = if svc.vip.is_ipv6() { 128 } else { 32 };
        let _ = writeln!(r, "-A KUBE-SERVICES -d {}/{host} -p tcp -m comment --comment \"bench/svc{i}:http cluster IP\" -m tcp --dport {} -j KUBE-SVC-{i:06}", svc.vip, svc.port);
        let n = svc.endpoints.len();
        for (j, _) in svc.endpoints.iter().enumerate() {
            if j + 1 < n {
                let p = 1.0 / (n - j) as f64;
                let _ = writeln!(r, "-A KUBE-SVC-{i:06} -m statistic --mode random --probability {p:.11} -j KUBE-SEP-{i:06}-{j:02}");
            } else {
                let _ = writeln!(r, "-A KUBE-SVC-{i:06} -j KUBE-SEP-{i:06}-{j:02}");
            }
        }
        for (j, (ip, port)) in svc.endpoints.iter().enumerate() {
            let to = SocketAddr::new(*ip, *port);
            let _ = writeln!(
                r,
                "-A KUBE-SEP-{i:06}-{j:02} -p tcp -m tcp -j DNAT --to-destination {to}"
            );
        }
    }
    r.push_str("COMMIT\n");
    r
}

pub fn nftables_rules(services: &[Service]) -> String {
    let six = services.first().is_some_and(|s| s.vip.is_ipv6());
    let (family, addr_type, daddr) = if six {
        ("ip6", "ipv6_addr", "ip6 daddr")
    } else {
        ("ip", "ipv4_addr", "ip daddr")
    };
    let mut r = format!("table {family} kube-proxy {{\n");
    let _ = writeln!(
        r,
        "  map service-ips {{\n    type {addr_type} . inet_proto . inet_service : verdict"
    );
    if !services.is_empty() {
        r.push_str("    elements = {\n");
        for (i, svc) in services.iter().enumerate() {
            let _ = writeln!(
                r,
                "      {} . tcp . {} : goto service-{i:06},",
                svc.vip, svc.port
            );
        }
        r.push_str("    }\n");
    }
    r.push_str("  }\n");
    let _ = writeln!(
        r,
        "  chain services {{\n    {daddr} . meta l4proto . th dport vmap @service-ips\n  }}"
    );
    r.push_str("  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }\n");
    r.push_str("  chain nat-output {\n    type nat hook output priority -100; policy accept;\n    jump services\n  }\n");
    for (i, svc) in services.iter().enumerate() {
        let arms: Vec<String> = (0..svc.endpoints.len())
            .map(|j| format!("{j} : goto endpoint-{i:06}-{j:02}"))
            .collect();
        let _ = writeln!(
            r,
            "  chain service-{i:06} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            svc.endpoints.len(),
            arms.join(", ")
        );
        for (j, (ip, port)) in svc.endpoints.iter().enumerate() {
            let to = SocketAddr::new(*ip, *port);
            let _ = writeln!(
                r,
                "  chain endpoint-{i:06}-{j:02} {{\n    meta l4proto tcp dnat to {to}\n  }}"
            );
        }
    }
    r.push_str("}\n");
    r
}

/// The manifest the agent reads for the same services.
pub fn manifest(services: &[Service]) -> String {
    let mut r = String::new();
    for (i, svc) in services.iter().enumerate() {
        let _ = write!(
            r,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: bench}}\nspec:\n  clusterIP: \"{vip}\"\n  clusterIPs: [\"{vip}\"]\n  ipFamilies: [{family}]\n  ports: [{{name: http, port: {}, targetPort: http}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc{i}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc{i}}}\n\
             addressType: {family}\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
            svc.port,
            vip = svc.vip,
            family = if svc.vip.is_ipv6() { "IPv6" } else { "IPv4" },
        );
        for (ip, _) in &svc.endpoints {
            let _ = writeln!(r, "- addresses: [\"{ip}\"]");
        }
        r.push_str("---\n");
    }
    r
}

/// Service i's cluster IP, in 198.19.0.0/16.
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 250) as u8, (1 + i % 250) as u8)
}
