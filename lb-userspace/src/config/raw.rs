//! The config file as serde sees it: every value validation may reject keeps its span.

use serde::Deserialize;

/// A value with its byte range in the file.
pub type Sp<T> = toml::Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub node: Node,
    pub metrics: Option<Sp<Metrics>>,
    #[serde(default)]
    pub vip: Vec<Sp<Vip>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub interfaces: Sp<Vec<String>>,
    pub xdp_mode: Option<Sp<String>>,
    pub encap_source_v4: Option<Sp<String>>,
    pub encap_source_v6: Option<Sp<String>>,
    pub gateway_mac: Option<Sp<String>>,
    pub src_mac: Option<Sp<String>>,
    pub mtu: Option<Sp<u32>>,
    pub l7_threads: Option<Sp<u32>>,
    pub l7_drain_timeout_ms: Option<Sp<u64>>,
    pub conntrack_flows_per_cpu: Option<Sp<u32>>,
    pub pin_dir: Option<Sp<String>>,
    pub admin_socket: Option<Sp<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub listen: Option<Sp<String>>,
    pub allow_remote: Option<Sp<bool>>,
    pub enabled: Option<Sp<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    pub name: Sp<String>,
    pub address: Sp<String>,
    pub port: Option<Sp<u16>>,
    pub protocol: Option<Sp<String>>,
    pub hash: Option<Sp<String>>,
    pub forwarding: Option<Sp<String>>,
    pub ring_size: Option<Sp<u32>>,
    pub conntrack: Option<Sp<bool>>,
    #[serde(default)]
    pub backends: Vec<Backend>,
    pub health: Option<Sp<Health>>,
    pub l7: Option<Sp<L7>>,
    #[serde(default)]
    pub route: Vec<Sp<Route>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L7 {
    pub mode: Option<Sp<String>>,
    pub algorithm: Option<Sp<String>>,
    pub retries: Option<Sp<u32>>,
    pub connect_timeout_ms: Option<Sp<u64>>,
    pub header_timeout_ms: Option<Sp<u64>>,
    pub response_timeout_ms: Option<Sp<u64>>,
    pub idle_timeout_ms: Option<Sp<u64>>,
    pub tunnel_timeout_ms: Option<Sp<u64>>,
    pub request_timeout_ms: Option<Sp<u64>>,
    pub max_header_bytes: Option<Sp<u32>>,
    pub max_headers: Option<Sp<u32>>,
    pub max_connections: Option<Sp<u32>>,
    pub upstream_keepalive: Option<Sp<u32>>,
    pub forwarded_for: Option<Sp<bool>>,
    pub normalize_path: Option<Sp<bool>>,
    pub access_log: Option<Sp<bool>>,
    pub proxy_protocol: Option<Sp<u8>>,
    pub cookie_name: Option<Sp<String>>,
    pub cookie_secret: Option<Sp<String>>,
    pub cookie_secret_previous: Option<Sp<String>>,
    pub cookie_attributes: Option<Sp<String>>,
    pub max_fails: Option<Sp<u32>>,
    pub fail_timeout_ms: Option<Sp<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub host: Option<Sp<String>>,
    pub path_prefix: Option<Sp<String>>,
    pub algorithm: Option<Sp<String>>,
    pub backends: Vec<Backend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub kind: Option<Sp<String>>,
    pub port: Option<Sp<u16>>,
    pub interval_ms: Option<Sp<u64>>,
    pub timeout_ms: Option<Sp<u64>>,
    pub rise: Option<Sp<u32>>,
    pub fall: Option<Sp<u32>>,
    pub path: Option<Sp<String>>,
    pub host: Option<Sp<String>>,
    pub expect_status: Option<Sp<u16>>,
    pub expect_body: Option<Sp<String>>,
    pub send: Option<Sp<String>>,
    pub expect: Option<Sp<String>>,
    pub send_hex: Option<Sp<String>>,
    pub expect_hex: Option<Sp<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub address: Sp<String>,
    pub port: Option<Sp<u16>>,
    pub weight: Option<Sp<u32>>,
    pub mac: Option<Sp<String>>,
}
