//! The files that give a pod its names: `/etc/resolv.conf` per
//! `dnsPolicy`, `/etc/hosts` with the pod's own name and `hostAliases`,
//! and its hostname (with `subdomain`), as upstream's kubelet writes them.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

/// The node's DNS settings the pod files are made from.
#[derive(Clone, Debug)]
pub struct ClusterDns {
    pub server: IpAddr,
    pub domain: String,
    /// The node's own resolv.conf, for `dnsPolicy: Default`.
    pub host_resolv: String,
}

/// The pod's hostname: `spec.hostname` or the pod name, cut to 63 bytes.
pub fn hostname(pod: &Pod) -> String {
    let spec = pod.spec.as_ref();
    let name = spec
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_else(|| "pod".into());
    let mut name = name.trim_end_matches(['-', '.']).to_owned();
    name.truncate(63);
    name
}

/// `/etc/resolv.conf` for the pod.
pub fn resolv_conf(pod: &Pod, dns: &ClusterDns) -> String {
    let spec = pod.spec.as_ref();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    let (mut servers, mut searches, mut options): (Vec<String>, Vec<String>, Vec<String>) =
        match (policy, host_network) {
            ("ClusterFirst", false) | ("ClusterFirstWithHostNet", _) => (
                vec![dns.server.to_string()],
                vec![
                    format!("{namespace}.svc.{}", dns.domain),
                    format!("svc.{}", dns.domain),
                    dns.domain.clone(),
                ],
                vec!["ndots:5".into()],
            ),
            ("None", _) => (Vec::new(), Vec::new(), Vec::new()),
            _ => parse_host(&dns.host_resolv),
        };
    if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
        servers.extend(config.nameservers.iter().flatten().cloned());
        searches.extend(config.searches.iter().flatten().cloned());
        for option in config.options.iter().flatten() {
            let Some(name) = &option.name else { continue };
            options.retain(|o| o.split(':').next() != Some(name.as_str()));
            options.push(match &option.value {
                Some(v) => format!("{name}:{v}"),
                None => name.clone(),
            });
        }
    }
    dedup(&mut servers);
    dedup(&mut searches);
    // The resolver reads at most three name servers and six search domains.
    servers.truncate(3);
    searches.truncate(6);
    let mut out = String::new();
    if !searches.is_empty() {
        out.push_str(&format!("search {}\n", searches.join(" ")));
    }
    for s in &servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

/// `/etc/hosts` for the pod.
pub fn hosts(pod: &Pod, pod_ips: &[IpAddr], domain: &str) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    let name = hostname(pod);
    let spec = pod.spec.as_ref();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let fqdn = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|s| !s.is_empty())
        .map(|sub| format!("{name}.{sub}.{namespace}.svc.{domain}"));
    for ip in pod_ips {
        match &fqdn {
            Some(fqdn) => out.push_str(&format!("{ip}\t{fqdn}\t{name}\n")),
            None => out.push_str(&format!("{ip}\t{name}\n")),
        }
    }
    if let Some(aliases) = spec.and_then(|s| s.host_aliases.as_ref()) {
        out.push_str("\n# Entries added by HostAliases.\n");
        for alias in aliases {
            let names = alias.hostnames.clone().unwrap_or_default().join("\t");
            out.push_str(&format!("{}\t{names}\n", alias.ip));
        }
    }
    out
}

fn parse_host(text: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut servers, mut searches, mut options) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => servers.extend(words.next().map(str::to_owned)),
            Some("search") | Some("domain") => {
                searches = words.map(str::to_owned).collect();
            }
            Some("options") => options.extend(words.map(str::to_owned)),
            _ => {}
        }
    }
    (servers, searches, options)
}

fn dedup(list: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    list.retain(|item| seen.insert(item.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn dns() -> ClusterDns {
        ClusterDns {
            server: "10.43.0.10".parse().unwrap(),
            domain: "cluster.local".into(),
            host_resolv: "nameserver 1.1.1.1\nsearch example.com\n".into(),
        }
    }

    #[test]
    fn cluster_first() {
        let conf = resolv_conf(&pod(serde_json::json!({"containers": []})), &dns());
        assert_eq!(
            conf,
            "search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.43.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn default_and_none_policies() {
        let conf = resolv_conf(
            &pod(serde_json::json!({"containers": [], "dnsPolicy": "Default"})),
            &dns(),
        );
        assert_eq!(conf, "search example.com\nnameserver 1.1.1.1\n");
        let conf = resolv_conf(
            &pod(
                serde_json::json!({"containers": [], "dnsPolicy": "None", "dnsConfig": {
                    "nameservers": ["9.9.9.9"], "searches": ["a.b"], "options": [{"name": "ndots", "value": "2"}]
                }}),
            ),
            &dns(),
        );
        assert_eq!(conf, "search a.b\nnameserver 9.9.9.9\noptions ndots:2\n");
    }

    #[test]
    fn hosts_file() {
        let p = pod(
            serde_json::json!({"containers": [], "hostname": "db", "subdomain": "svc1",
            "hostAliases": [{"ip": "1.2.3.4", "hostnames": ["foo", "bar"]}]}),
        );
        let text = hosts(&p, &["10.42.0.5".parse().unwrap()], "cluster.local");
        assert!(
            text.contains("10.42.0.5\tdb.svc1.shop.svc.cluster.local\tdb\n"),
            "{text}"
        );
        assert!(text.contains("1.2.3.4\tfoo\tbar\n"), "{text}");
    }
}
