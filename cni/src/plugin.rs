//! The CNI plugin (`skiff cni`, or the `skiff` binary run by a CNI runtime
//! with no arguments): the same bridge network, driven by the CNI 1.x
//! protocol.
//!
//! Input: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME` and a
//! plugin configuration on stdin:
//!
//! ```json
//! {"cniVersion":"1.0.0","name":"skiff","type":"skiff","bridge":"skiff0",
//!  "podCIDR":"10.42.1.0/24","mtu":1450,"dataDir":"/var/lib/cni/networks/skiff"}
//! ```
//!
//! `bridge` defaults to `skiff0`, `mtu` to 1500, `dataDir` to
//! `/var/lib/cni/networks/<name>`. Output: the spec's success, version or
//! error JSON on stdout; exit status 1 on error. The attachment is keyed by
//! the container id (one interface per container on this network).
//!
//! Error codes: the spec's 1 (version), 4 (environment), 5 (I/O), 6
//! (decoding), 7 (configuration), 50 (STATUS: not available); ours are 100
//! (no free address), 101 (a name is taken), 102 (CHECK found a difference),
//! 999 (system call or netlink failure).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::CniError;
use crate::ipam::{self, Ipam};
use crate::network::{Attachment, BridgeConfig, BridgeNetwork};
use crate::veth;

/// Spec versions this plugin speaks; the last is its preferred one.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// Configurations larger than this are refused (they are a few hundred
/// bytes; this only bounds a runaway writer).
const MAX_STDIN: u64 = 1 << 20;

/// What the plugin prints and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub code: i32,
}

/// Whether this process looks like a CNI runtime's plugin call: no
/// arguments, and `CNI_COMMAND` set.
pub fn invoked_by_runtime() -> bool {
    std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some()
}

/// Runs the plugin on this process's environment and stdin, prints the
/// result and returns the exit status.
pub fn main() -> i32 {
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(key, _)| key.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    let output = match read {
        Err(e) => error_output(
            None,
            &PluginError::new(5, "cannot read stdin", e.to_string()),
        ),
        Ok(_) if stdin.len() as u64 > MAX_STDIN => error_output(
            None,
            &PluginError::new(
                5,
                "configuration too large",
                format!("over {MAX_STDIN} bytes"),
            ),
        ),
        Ok(_) => run(&env, &stdin),
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(output.stdout.as_bytes());
    let _ = out.flush();
    output.code
}

/// Runs one plugin call. `env` holds the `CNI_*` variables.
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Output {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return error_output(None, &PluginError::new(999, "cannot start", e.to_string())),
    };
    let version = requested_version(stdin);
    match runtime.block_on(execute(env, stdin)) {
        Ok(Some(result)) => Output {
            stdout: format!("{result}\n"),
            code: 0,
        },
        Ok(None) => Output {
            stdout: String::new(),
            code: 0,
        },
        Err(err) => error_output(version.as_deref(), &err),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PluginError {
    code: u32,
    msg: String,
    details: String,
}

impl PluginError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

impl From<CniError> for PluginError {
    fn from(err: CniError) -> Self {
        let (code, msg) = match &err {
            CniError::Exhausted(_) => (100, "no free address"),
            CniError::Conflict(_) => (101, "name already in use"),
            CniError::Missing(_) => (102, "attachment not as expected"),
            CniError::Invalid { .. } => (7, "invalid network configuration"),
            CniError::Io { .. } => (5, "I/O failure"),
            CniError::Sys { .. } | CniError::Netlink { .. } | CniError::Thread(_) => {
                (999, "network setup failed")
            }
        };
        Self::new(code, msg, err.to_string())
    }
}

/// The plugin's part of the configuration; other keys (`ipam`, `dns`,
/// `args`, `runtimeConfig`, ...) are allowed and ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    name: String,
    #[serde(rename = "podCIDR", deserialize_with = "cidr")]
    pod_cidr: Ipv4Net,
    #[serde(default = "default_bridge")]
    bridge: String,
    #[serde(default = "default_mtu")]
    mtu: u32,
    data_dir: Option<PathBuf>,
    prev_result: Option<Value>,
    dns: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Deserialize)]
struct ValidAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
}

fn cidr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Ipv4Net, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse()
        .map_err(|_| serde::de::Error::custom(format!("podCIDR {text:?} is not an IPv4 CIDR")))
}

fn default_bridge() -> String {
    "skiff0".into()
}

fn default_mtu() -> u32 {
    1500
}

async fn execute(
    env: &HashMap<String, String>,
    stdin: &[u8],
) -> Result<Option<Value>, PluginError> {
    let command = env
        .get("CNI_COMMAND")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| PluginError::new(4, "missing environment variables", "CNI_COMMAND"))?;
    if command == "VERSION" {
        let version = requested_version(stdin).unwrap_or_else(|| preferred().to_string());
        return Ok(Some(json!({
            "cniVersion": version,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let required: &[&str] = match command.as_str() {
        "ADD" | "CHECK" => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
        "DEL" => &["CNI_CONTAINERID", "CNI_IFNAME"],
        "STATUS" | "GC" => &[],
        other => {
            return Err(PluginError::new(
                4,
                "invalid environment variables",
                format!("CNI_COMMAND={other:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
            ));
        }
    };
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|key| env.get(*key).is_none_or(|v| v.is_empty()))
        .collect();
    if !missing.is_empty() {
        return Err(PluginError::new(
            4,
            "missing environment variables",
            missing.join(", "),
        ));
    }
    let conf = parse_config(stdin)?;
    let var = |key: &str| env.get(key).map(String::as_str).unwrap_or_default();
    let container_id = var("CNI_CONTAINERID");
    let ifname = var("CNI_IFNAME");
    if !container_id.is_empty() && ipam::validate_id(container_id).is_err() {
        return Err(PluginError::new(
            4,
            "invalid environment variables",
            "CNI_CONTAINERID",
        ));
    }
    if !ifname.is_empty() && veth::validate_ifname(ifname).is_err() {
        return Err(PluginError::new(
            4,
            "invalid environment variables",
            "CNI_IFNAME",
        ));
    }
    let netns = env
        .get("CNI_NETNS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let config = bridge_config(&conf);

    match command.as_str() {
        "ADD" => {
            let netns = existing_netns(netns)?;
            let network = BridgeNetwork::new(config).await?;
            let attachment = network.attach(container_id, &netns, ifname).await?;
            Ok(Some(
                add_result(&conf, &network, &attachment, &netns, ifname).await?,
            ))
        }
        "DEL" => {
            let network = BridgeNetwork::open(config).await?;
            network.detach(container_id, netns.as_deref()).await?;
            Ok(None)
        }
        "CHECK" => {
            let netns = existing_netns(netns)?;
            let prev = conf.prev_result.as_ref().ok_or_else(|| {
                PluginError::new(7, "invalid network configuration", "CHECK needs prevResult")
            })?;
            let network = BridgeNetwork::open(config).await?;
            let attachment = network.check(container_id, &netns, ifname).await?;
            check_against(prev, &attachment, ifname)?;
            Ok(None)
        }
        "STATUS" => {
            status(&config)
                .map_err(|e| PluginError::new(50, "plugin not available", e.to_string()))?;
            Ok(None)
        }
        _ => {
            // GC: release every attachment the runtime no longer knows.
            let keep: HashSet<String> = conf
                .valid_attachments
                .iter()
                .flatten()
                .map(|a| a.container_id.clone())
                .collect();
            let network = BridgeNetwork::open(config).await?;
            network.retain(|id| keep.contains(id)).await?;
            Ok(None)
        }
    }
}

fn parse_config(stdin: &[u8]) -> Result<NetConf, PluginError> {
    let value: Value = serde_json::from_slice(stdin)
        .map_err(|e| PluginError::new(6, "cannot decode network configuration", e.to_string()))?;
    let version = value
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(PluginError::new(
            1,
            "incompatible CNI version",
            format!(
                "cniVersion {version:?}; this plugin supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let conf: NetConf = serde_json::from_value(value)
        .map_err(|e| PluginError::new(7, "invalid network configuration", e.to_string()))?;
    ipam::validate_id(&conf.name).map_err(|_| {
        PluginError::new(
            7,
            "invalid network configuration",
            format!(
                "name {:?}: start with a letter or digit; then letters, digits, '_', '.', '-'",
                conf.name
            ),
        )
    })?;
    veth::validate_ifname(&conf.bridge)
        .map_err(|e| PluginError::new(7, "invalid network configuration", e.to_string()))?;
    if conf.pod_cidr.prefix_len() > 30 {
        return Err(PluginError::new(
            7,
            "invalid network configuration",
            format!("podCIDR {} is too small to allocate from", conf.pod_cidr),
        ));
    }
    if !(68..=65535).contains(&conf.mtu) {
        return Err(PluginError::new(
            7,
            "invalid network configuration",
            format!("mtu {} is outside 68..65535", conf.mtu),
        ));
    }
    Ok(conf)
}

fn bridge_config(conf: &NetConf) -> BridgeConfig {
    BridgeConfig {
        bridge: conf.bridge.clone(),
        pod_cidr: conf.pod_cidr,
        mtu: conf.mtu,
        state_dir: conf
            .data_dir
            .clone()
            .unwrap_or_else(|| Path::new("/var/lib/cni/networks").join(&conf.name)),
        host_netns: None,
    }
}

fn existing_netns(netns: Option<PathBuf>) -> Result<PathBuf, PluginError> {
    match netns {
        Some(path) if path.exists() => Ok(path),
        Some(path) => Err(PluginError::new(
            4,
            "invalid environment variables",
            format!("CNI_NETNS: {} does not exist", path.display()),
        )),
        None => Err(PluginError::new(
            4,
            "missing environment variables",
            "CNI_NETNS",
        )),
    }
}

/// The success result: earlier plugins' interfaces, IPs and routes (from
/// `prevResult`) followed by ours: the bridge, the host veth, the pod end.
async fn add_result(
    conf: &NetConf,
    network: &BridgeNetwork,
    attachment: &Attachment,
    netns: &Path,
    ifname: &str,
) -> Result<Value, PluginError> {
    let prev = conf.prev_result.as_ref();
    let list = |key: &str| -> Vec<Value> {
        prev.and_then(|p| p.get(key))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut interfaces = list("interfaces");
    let mut ips = list("ips");
    let mut routes = list("routes");
    let bridge_mac = network.host_link_mac(&conf.bridge).await?;
    let host_mac = network.host_link_mac(&attachment.host_veth).await?;
    let mut interface = |name: &str, mac: Option<[u8; 6]>, sandbox: Option<&Path>| {
        let mut entry = json!({ "name": name });
        if let Some(mac) = mac {
            entry["mac"] = json!(format_mac(mac));
        }
        if let Some(sandbox) = sandbox {
            entry["sandbox"] = json!(sandbox.display().to_string());
        }
        interfaces.push(entry);
        interfaces.len() - 1
    };
    interface(&conf.bridge, bridge_mac, None);
    interface(&attachment.host_veth, host_mac, None);
    let pod = interface(ifname, Some(attachment.mac), Some(netns));
    ips.push(json!({
        "address": attachment.ip.to_string(),
        "gateway": attachment.gateway.to_string(),
        "interface": pod,
    }));
    routes.push(json!({ "dst": "0.0.0.0/0", "gw": attachment.gateway.to_string() }));
    let dns = conf
        .dns
        .clone()
        .or_else(|| prev.and_then(|p| p.get("dns")).cloned())
        .unwrap_or_else(|| json!({}));
    Ok(json!({
        "cniVersion": conf.cni_version,
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": dns,
    }))
}

/// CHECK: what ADD reported must still be true.
fn check_against(prev: &Value, attachment: &Attachment, ifname: &str) -> Result<(), PluginError> {
    let mismatch = |what: String| PluginError::new(102, "attachment not as expected", what);
    let address = attachment.ip.to_string();
    let has_ip = prev
        .get("ips")
        .and_then(Value::as_array)
        .is_some_and(|ips| {
            ips.iter()
                .any(|ip| ip.get("address") == Some(&json!(address)))
        });
    if !has_ip {
        return Err(mismatch(format!("prevResult does not list {address}")));
    }
    let pod_end = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .and_then(|ifs| {
            ifs.iter().find(|i| {
                i.get("name") == Some(&json!(ifname))
                    && i.get("sandbox")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
            })
        })
        .ok_or_else(|| mismatch(format!("prevResult lists no sandbox interface {ifname}")))?;
    if let Some(mac) = pod_end.get("mac").and_then(Value::as_str)
        && !mac.eq_ignore_ascii_case(&format_mac(attachment.mac))
    {
        return Err(mismatch(format!(
            "{ifname} has MAC {}, prevResult says {mac}",
            format_mac(attachment.mac)
        )));
    }
    Ok(())
}

/// STATUS: ready when the IPAM folder can be opened and locked.
fn status(config: &BridgeConfig) -> Result<(), CniError> {
    Ipam::open(&config.state_dir, config.pod_cidr)?.probe()
}

fn requested_version(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(stdin)
        .ok()?
        .get("cniVersion")?
        .as_str()
        .map(str::to_string)
}

fn preferred() -> &'static str {
    SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1]
}

fn error_output(version: Option<&str>, err: &PluginError) -> Output {
    // The error's version echoes the configuration's when there is a usable
    // one; otherwise the plugin's own.
    let version = version
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(preferred());
    let body = json!({
        "cniVersion": version,
        "code": err.code,
        "msg": err.msg,
        "details": err.details,
    });
    Output {
        stdout: format!("{body}\n"),
        code: 1,
    }
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn error_code(output: &Output) -> u64 {
        assert_eq!(output.code, 1, "{}", output.stdout);
        let body: Value = serde_json::from_str(&output.stdout).unwrap();
        assert!(body["msg"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(body["details"].is_string());
        body["code"].as_u64().unwrap()
    }

    const CONF: &str =
        r#"{"cniVersion":"1.0.0","name":"skiff","type":"skiff","podCIDR":"10.42.1.0/24"}"#;

    #[test]
    fn version_reports_supported_versions() {
        let out = run(
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"1.0.0"}"#,
        );
        assert_eq!(out.code, 0);
        let body: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(body["cniVersion"], "1.0.0");
        assert_eq!(body["supportedVersions"], json!(["1.0.0", "1.1.0"]));
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), b"");
        assert_eq!(out.code, 0);
    }

    #[test]
    fn environment_problems_are_code_4() {
        assert_eq!(error_code(&run(&env(&[]), CONF.as_bytes())), 4);
        assert_eq!(
            error_code(&run(&env(&[("CNI_COMMAND", "FROB")]), CONF.as_bytes())),
            4
        );
        let out = run(
            &env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]),
            CONF.as_bytes(),
        );
        assert_eq!(error_code(&out), 4);
        assert!(out.stdout.contains("CNI_CONTAINERID") && out.stdout.contains("CNI_NETNS"));
        let bad_id = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(error_code(&run(&bad_id, CONF.as_bytes())), 4);
        let no_ns = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/nonexistent/ns"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(error_code(&run(&no_ns, CONF.as_bytes())), 4);
    }

    #[test]
    fn configuration_problems_have_their_codes() {
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(error_code(&run(&del, b"{not json")), 6);
        let old = br#"{"cniVersion":"0.3.1","name":"n","type":"skiff","podCIDR":"10.42.1.0/24"}"#;
        let out = run(&del, old);
        assert_eq!(error_code(&out), 1);
        for bad in [
            r#"{"cniVersion":"1.0.0","name":"n","type":"skiff"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","type":"skiff","podCIDR":"10.42.1.0/33"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","type":"skiff","podCIDR":"10.42.1.0/31"}"#,
            r#"{"cniVersion":"1.0.0","name":"../x","type":"skiff","podCIDR":"10.42.1.0/24"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","type":"skiff","podCIDR":"10.42.1.0/24","mtu":10}"#,
            r#"{"cniVersion":"1.0.0","name":"n","type":"skiff","podCIDR":"10.42.1.0/24","bridge":"a b"}"#,
        ] {
            let out = run(&del, bad.as_bytes());
            assert_eq!(error_code(&out), 7, "{bad}");
            assert!(
                out.stdout.contains("\"cniVersion\":\"1.0.0\""),
                "{}",
                out.stdout
            );
        }
    }

    #[test]
    fn check_compares_with_prev_result() {
        let attachment = Attachment {
            ip: "10.42.1.5/24".parse().unwrap(),
            gateway: "10.42.1.1".parse().unwrap(),
            host_veth: "veth01234567".into(),
            mac: [2, 0, 0, 0, 0, 1],
        };
        let good = json!({
            "interfaces": [{"name": "skiff0"}, {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "10.42.1.5/24", "interface": 1}],
        });
        assert!(check_against(&good, &attachment, "eth0").is_ok());
        let mut wrong_mac = good.clone();
        wrong_mac["interfaces"][1]["mac"] = json!("02:00:00:00:00:02");
        assert_eq!(
            check_against(&wrong_mac, &attachment, "eth0")
                .unwrap_err()
                .code,
            102
        );
        let mut wrong_ip = good.clone();
        wrong_ip["ips"][0]["address"] = json!("10.42.1.6/24");
        assert_eq!(
            check_against(&wrong_ip, &attachment, "eth0")
                .unwrap_err()
                .code,
            102
        );
        assert!(check_against(&good, &attachment, "eth1").is_err());
    }
}
