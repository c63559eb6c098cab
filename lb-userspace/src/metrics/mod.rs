//! Prometheus metrics on `metrics.listen` (default 127.0.0.1:9110, loopback only unless
//! `metrics.allow_remote` says otherwise), in the OpenMetrics text format of `prometheus-client`.
//!
//! Kernel counters live in per-CPU maps that only the controller thread reads, so a scrape is a
//! message to the controller: it refreshes a [`KernelSnapshot`] from the maps, then encodes the
//! registry, whose [`KernelCollector`] renders that snapshot. Health-check latency histograms and
//! state-transition counters are ordinary registered metrics, updated as events arrive; a
//! successful reload removes ([`Metrics::retain`]) the series of backends and VIPs it took out,
//! so that departed backends do not pile up in scrapes and in memory.

mod histogram;
mod serve;

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

pub use histogram::LatencyHistogram;
pub use serve::{Scrape, Serving, bind, serve, serve_with};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};

use lb_common::{Counters, stats::REASON_NAMES};

/// Labels of per-backend health metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// VIP name.
    pub vip: String,
    /// Backend address.
    pub backend: String,
}

/// Labels of `edgelb_build_info`: which build this process is ([`crate::build`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate's version, `0.1.0`.
    pub version: String,
    /// The git commit, `abc1234`, `abc1234-dirty` or `unknown`.
    pub commit: String,
}

/// Labels of health-state transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// VIP name.
    pub vip: String,
    /// Backend address.
    pub backend: String,
    /// New state: "up" or "down".
    pub to: String,
}

/// One backend's numbers at scrape time.
#[derive(Clone, Debug, Default)]
pub struct BackendSample {
    /// VIP name.
    pub vip: String,
    /// Backend, as [`backend_label`] writes it.
    pub backend: String,
    /// Kernel counters; `None` for an L7 VIP's backend: XDP passes an L7 VIP's traffic to the
    /// kernel without counting it, so such series would only ever read 0 (the `edgelb_l7_*`
    /// families count that traffic). Its `up` and `weight` gauges are rendered all the same.
    pub counters: Option<Counters>,
    /// Health verdict.
    pub up: bool,
    /// Effective weight: the configured one, 0 while drained or down, except that down backends
    /// keep theirs while their VIP fails open (every backend down: all are served anyway).
    pub weight: u32,
}

/// The kernel-side numbers, refreshed by the controller before each scrape.
#[derive(Clone, Debug, Default)]
pub struct KernelSnapshot {
    /// (VIP name, counters) of the VIPs XDP balances; none of L7 VIPs, for the reason given at
    /// [`BackendSample::counters`].
    pub vips: Vec<(String, Counters)>,
    /// Per backend.
    pub backends: Vec<BackendSample>,
    /// Reason slots, in `REASON_NAMES` order.
    pub reasons: Vec<u64>,
    /// Connection-table events, in `lb_common::ct_stats::NAMES` order.
    pub conntrack: Vec<u64>,
    /// (interface, XDP still on it) for every interface the balancer was attached to.
    pub interfaces: Vec<(String, bool)>,
    /// (interface, MTU) of the configured interfaces, as the kernel last gave them.
    pub interface_mtus: Vec<(String, u32)>,
    /// (interface, `node.gateway_mac` is not the MAC the kernel gives the gateway of the route
    /// to the backends out of it), when the gateway MAC is used.
    pub gateway_mac_mismatch: Vec<(String, bool)>,
    /// (VIP name, failing open) of every VIP.
    pub fail_open: Vec<(String, bool)>,
}

/// A counter family: name suffix, help text, and how to read it from [`Counters`].
type CounterField = (&'static str, &'static str, fn(&Counters) -> u64);

/// Renders a [`KernelSnapshot`] at scrape time.
#[derive(Debug, Clone, Default)]
pub struct KernelCollector(pub Arc<Mutex<KernelSnapshot>>);

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = self.0.lock().map_err(|_| fmt::Error)?;
        let counters: [CounterField; 3] = [
            ("packets", "Packets forwarded by the XDP balancer", |c| c.packets),
            ("bytes", "Bytes forwarded by the XDP balancer (as received)", |c| c.bytes),
            (
                "new_flows",
                "Packets placed by the Maglev ring, not connections: every SYN, every packet no connection-table entry held, every packet of a VIP without a table",
                |c| c.new_flows,
            ),
        ];
        for (what, help, get) in counters {
            let name = format!("edgelb_vip_{what}");
            let mut m = encoder.encode_descriptor(&name, help, None, MetricType::Counter)?;
            for (vip, c) in &snap.vips {
                ConstCounter::new(get(c)).encode(m.encode_family(&labels(&[("vip", vip)]))?)?;
            }
            let name = format!("edgelb_backend_{what}");
            let mut m = encoder.encode_descriptor(&name, help, None, MetricType::Counter)?;
            for b in &snap.backends {
                let Some(c) = &b.counters else { continue };
                let l = labels(&[("vip", &b.vip), ("backend", &b.backend)]);
                ConstCounter::new(get(c)).encode(m.encode_family(&l)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "edgelb_xdp_verdicts",
            "Packets seen by the XDP balancer, by what it did with them and why",
            None,
            MetricType::Counter,
        )?;
        for (name, v) in REASON_NAMES.iter().zip(&snap.reasons) {
            let (action, reason) = name.split_once('_').unwrap_or(("pass", name));
            let l = labels(&[("action", action), ("reason", reason)]);
            ConstCounter::new(*v).encode(m.encode_family(&l)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgelb_conntrack_events",
            "Connection-table events: flows evicted from a full bucket by new ones other than TCP \
             SYNs (evicted), established flows found on another CPU's table: RSS or IRQ affinity \
             moved them (found_on_other_cpu), established TCP flows no table held: pushed out \
             before they ended, a table too small for the traffic (missed_established), and \
             segments of flows this CPU did not know that were not looked for on the other CPUs \
             because its budget of such searches was spent: a flood of segments of unknown \
             flows, such as spoofed ACKs (search_skipped)",
            None,
            MetricType::Counter,
        )?;
        for (name, v) in lb_common::ct_stats::NAMES.iter().zip(&snap.conntrack) {
            ConstCounter::new(*v).encode(m.encode_family(&labels(&[("event", name)]))?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgelb_xdp_attached",
            "1 while the kernel reports the balancer's XDP program on the interface, 0 once the \
             interface was deleted, or deleted and re-created (at the same index too), or its \
             XDP link detached, under it (its VIP traffic then reaches the kernel unbalanced \
             until edgelb attaches it again, which it does once the interface is there, or, \
             where the kernel refuses that, a restart does); a renamed interface stays 1 under the \
             name it was attached by, as XDP stays on the device (the log and status give its \
             new name)",
            None,
            MetricType::Gauge,
        )?;
        for (interface, on) in &snap.interfaces {
            let l = labels(&[("interface", interface)]);
            ConstGauge::new(i64::from(*on)).encode(m.encode_family(&l)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgelb_interface_mtu",
            "The interface's MTU, as the kernel gives it in edgelb's network namespace (read \
             every second); with an ipip VIP, a node.mtu above it is logged as a warning, as \
             encapsulated packets between the two sizes are dropped past the node without an \
             ICMP error",
            None,
            MetricType::Gauge,
        )?;
        for (interface, mtu) in &snap.interface_mtus {
            let l = labels(&[("interface", interface)]);
            ConstGauge::new(i64::from(*mtu)).encode(m.encode_family(&l)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgelb_gateway_mac_mismatch",
            "1 while node.gateway_mac is not the MAC the kernel's neighbour table gives the \
             gateway of the route to the backends out of the interface, for an address family \
             whose ipip backends use it (checked every 10 s and at a reload): ipip packets to \
             backends without a mac of their own then go to a MAC that is not the gateway's \
             and are lost, while health checks stay up; 0 when it is, or none is known. Only \
             while some ipip backend uses node.gateway_mac",
            None,
            MetricType::Gauge,
        )?;
        for (interface, on) in &snap.gateway_mac_mismatch {
            let l = labels(&[("interface", interface)]);
            ConstGauge::new(i64::from(*on)).encode(m.encode_family(&l)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgelb_vip_fail_open",
            "1 while every backend of the VIP that should take new flows is down by its health \
             check, so that all of them are served anyway (fail open), else 0",
            None,
            MetricType::Gauge,
        )?;
        for (vip, on) in &snap.fail_open {
            ConstGauge::new(i64::from(*on)).encode(m.encode_family(&labels(&[("vip", vip)]))?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgelb_backend_up",
            "1 when the backend passes its health check (or has none), 0 when it is down",
            None,
            MetricType::Gauge,
        )?;
        for b in &snap.backends {
            let l = labels(&[("vip", &b.vip), ("backend", &b.backend)]);
            ConstGauge::new(i64::from(b.up)).encode(m.encode_family(&l)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgelb_backend_weight",
            "Effective weight: the configured one, 0 while drained or down, except while the VIP \
             fails open (every backend down), when down backends keep theirs and are served",
            None,
            MetricType::Gauge,
        )?;
        for b in &snap.backends {
            let l = labels(&[("vip", &b.vip), ("backend", &b.backend)]);
            ConstGauge::new(i64::from(b.weight)).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

/// The controller's metrics.
pub struct Metrics {
    registry: Registry,
    /// Refreshed before each scrape.
    pub kernel: Arc<Mutex<KernelSnapshot>>,
    health_latency: Family<BackendLabels, Histogram>,
    /// Failed probes of each checked backend ([`Metrics::probed`]).
    health_failures: Family<BackendLabels, Counter>,
    transitions: Family<TransitionLabels, Counter>,
    /// Health probes that failed on this node's side (see [`Metrics::probe_local_error`]).
    probe_local_errors: Counter,
    /// Health checks that could not start (see [`Metrics::checks_missing`]).
    checks_missing: Gauge,
    /// The (VIP, backend) pairs `health_latency`, `health_failures` and `transitions` may have
    /// series of:
    /// prometheus-client cannot list a family's label sets, and [`Metrics::retain`] needs them.
    health_series: Mutex<HashSet<BackendLabels>>,
    /// The L7 proxy's metrics, in the same registry.
    pub l7: Arc<crate::proxy::L7Metrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every edgelb metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let kernel = Arc::new(Mutex::new(KernelSnapshot::default()));
        registry.register_collector(Box::new(KernelCollector(kernel.clone())));
        let health_latency = Family::<BackendLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0])
        });
        registry.register_with_unit(
            "edgelb_health_check_duration",
            "Duration of successful health-check probes",
            Unit::Seconds,
            health_latency.clone(),
        );
        let health_failures = Family::<BackendLabels, Counter>::default();
        registry.register(
            "edgelb_health_check_failures",
            "Failed health-check probes (each one, not only those that took a backend down: a \
             backend failing fewer than fall in a row shows here only)",
            health_failures.clone(),
        );
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "edgelb_backend_transitions",
            "Health state changes of backends",
            transitions.clone(),
        );
        let probe_local_errors = Counter::default();
        registry.register(
            "edgelb_health_probe_local_errors",
            "Health-check probes that failed on this node's side (out of descriptors, memory, \
             buffers or local ports): not counted against the backend, whose state they leave \
             as it was",
            probe_local_errors.clone(),
        );
        let checks_missing = Gauge::default();
        registry.register(
            "edgelb_health_checks_missing",
            "Health checks that could not start (no thread to be had: a process or cgroup task \
             limit), retried every second: their backends keep the controller's verdict (up \
             unless known down) while no probe runs",
            checks_missing.clone(),
        );
        registry.register(
            "edgelb_panics",
            "Panics of any edgelb thread since the process started, a connection task's \
             included (the proxy closes that connection and goes on): each is logged as an \
             error with the thread, the place and the message; any is a bug to report",
            crate::panics::counter(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        let labels = BuildLabels {
            version: crate::build::VERSION.to_owned(),
            commit: crate::build::COMMIT.to_owned(),
        };
        build.get_or_create(&labels).set(1);
        registry.register(
            "edgelb_build_info",
            "Always 1, labelled with this process's build: its version and the git commit it was \
             built from (-dirty: with changes not committed; unknown: built where git could not \
             tell), to tell which binary runs on each node during a rolling upgrade, and whether \
             a takeover swapped it",
            build,
        );
        registry.register(
            "edgelb_log_lines_dropped",
            "Log lines dropped because the log's reader (journald, a container's log driver) \
             did not take them as fast as they came and the log's queue was full: edgelb \
             drops lines rather than stall its threads on a blocked stderr",
            crate::logging::DroppedLines,
        );
        let l7 = crate::proxy::L7Metrics::register(&mut registry);
        Metrics {
            checks_missing,
            registry,
            kernel,
            health_latency,
            health_failures,
            transitions,
            probe_local_errors,
            health_series: Mutex::default(),
            l7,
        }
    }

    /// Records a successful probe's latency (the backend as [`backend_label`] writes it).
    pub fn observe_probe(&self, labels: &BackendLabels, latency: Duration) {
        self.health_latency.get_or_create(labels).observe(latency.as_secs_f64());
        self.note_health_series(labels);
    }

    /// Records one probe of a checked backend (the backend as [`backend_label`] writes it), as
    /// the controller gets it: a successful one's latency, or a failed one in
    /// `edgelb_health_check_failures_total` (not one that failed on this node's side, which
    /// [`Metrics::probe_local_error`] counts). The labels are borrowed: every probe comes
    /// here (thousands a second on a large config), and nothing is allocated for one whose
    /// series exist.
    pub fn probed(&self, ev: &crate::health::HealthEvent, labels: &BackendLabels) {
        if let Some(latency) = ev.latency {
            self.observe_probe(labels, latency);
        } else if ev.failed() {
            self.health_failures.get_or_create(labels).inc();
            self.note_health_series(labels);
        }
    }

    /// Notes that `labels` has health series, for [`Metrics::retain`] to remove; copied only
    /// the first time.
    fn note_health_series(&self, labels: &BackendLabels) {
        let mut series = self.health_series.lock().unwrap_or_else(PoisonError::into_inner);
        if !series.contains(labels) {
            series.insert(labels.clone());
        }
    }

    /// Counts a probe that failed on this node's side: it said nothing of its backend, so no
    /// other metric shows it, and a node starving its own probes would look all green.
    pub fn probe_local_error(&self) {
        self.probe_local_errors.inc();
    }

    /// Sets how many health checks could not start: their backends read `up` without any probe
    /// behind it, and only this gauge (and one log line per episode) says so.
    pub fn checks_missing(&self, n: usize) {
        self.checks_missing.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a health transition (`backend` as [`backend_label`] writes it).
    pub fn transition(&self, vip: &str, backend: String, up: bool) {
        let labels = TransitionLabels {
            vip: vip.to_owned(),
            backend,
            to: if up { "up" } else { "down" }.to_owned(),
        };
        self.transitions.get_or_create(&labels).inc();
        let pair = BackendLabels { vip: labels.vip, backend: labels.backend };
        self.health_series.lock().unwrap_or_else(PoisonError::into_inner).insert(pair);
    }

    /// Removes the series of every (VIP, backend) pair and VIP that `cfg` (the configured
    /// config a reload just put in force, not the effective one: a backend that is down or
    /// drained is still configured) no longer has, health-check and L7 alike, and the
    /// health-check series of the VIPs it no longer checks. The series of everything still
    /// configured (and checked) are untouched: their counters go on from where they were.
    /// A backend that comes back later starts new series from zero, as after a restart.
    ///
    /// Every health-checked backend's transition and probe failure counters, and every L7
    /// backend's ejection
    /// counter, are made here at 0 if they do not exist yet (the controller calls this at its
    /// start too): a counter that appeared only at its first increment would hide that
    /// increment from `increase()` and `rate()`, and a backend's first flap from a dashboard.
    ///
    /// The kernel counters (of XDP VIPs only) and the up/weight gauges need nothing: they are
    /// rendered from the running config at each scrape.
    pub fn retain(&self, cfg: &crate::config::Config) {
        // Only checked VIPs' backends: a reload that takes a VIP's check away leaves nothing to
        // move its series, which would be scraped on, frozen, as if a check still ran.
        let keep: HashSet<BackendLabels> = cfg
            .vips
            .iter()
            .filter(|v| v.health.is_some())
            .flat_map(|v| {
                v.backends
                    .iter()
                    .map(|b| BackendLabels { vip: v.name.clone(), backend: backend_label(v, b) })
            })
            .collect();
        let mut series = self.health_series.lock().unwrap_or_else(PoisonError::into_inner);
        series.retain(|pair| {
            if keep.contains(pair) {
                return true;
            }
            self.health_latency.remove(pair);
            self.health_failures.remove(pair);
            for to in ["up", "down"] {
                self.transitions.remove(&TransitionLabels {
                    vip: pair.vip.clone(),
                    backend: pair.backend.clone(),
                    to: to.to_owned(),
                });
            }
            false
        });
        for vip in cfg.vips.iter().filter(|v| v.health.is_some()) {
            for b in &vip.backends {
                let pair = BackendLabels { vip: vip.name.clone(), backend: backend_label(vip, b) };
                for to in ["up", "down"] {
                    let _ = self.transitions.get_or_create(&TransitionLabels {
                        vip: pair.vip.clone(),
                        backend: pair.backend.clone(),
                        to: to.to_owned(),
                    });
                }
                let _ = self.health_failures.get_or_create(&pair);
                series.insert(pair);
            }
        }
        drop(series);
        self.l7.retain(cfg);
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// A backend's `backend` label: its address, or for an L7 VIP (whose backends may share an
/// address on several ports) address:port, as the proxy's own metrics name it.
pub fn backend_label(vip: &crate::config::Vip, b: &crate::config::Backend) -> String {
    if vip.l7.is_some() {
        SocketAddr::new(b.address, b.port).to_string()
    } else {
        b.address.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthEvent;

    /// A config with an XDP VIP `web` and an L7 VIP `app` whose backends are 198.18.0.x for
    /// each x of `hosts` (port 80 for `app`), and with `gone`, a VIP of one backend, 198.18.0.13.
    fn config(hosts: &[u8], gone: bool) -> crate::config::Config {
        let list = |port: &str| {
            let b: Vec<String> =
                hosts.iter().map(|h| format!("{{ address = \"198.18.0.{h}\"{port} }}")).collect();
            b.join(", ")
        };
        let mut text = format!(
            "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\n\
             gateway_mac = \"02:00:00:00:00:fe\"\n\
             [[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{}]\n\
             [vip.health]\n\
             [[vip]]\nname = \"app\"\naddress = \"198.18.1.6\"\nport = 8080\n\
             forwarding = \"l7\"\nbackends = [{}]\n[vip.l7]\n[vip.health]\n",
            list(""),
            list(", port = 80"),
        );
        if gone {
            text.push_str(
                "[[vip]]\nname = \"gone\"\naddress = \"198.18.1.1\"\nport = 81\n\
                 backends = [{ address = \"198.18.0.13\" }]\n[vip.health]\n",
            );
        }
        crate::config::Config::parse(&text, "t.toml".as_ref()).expect("valid config")
    }

    /// The value of the sample `name{labels}` in `text`.
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let want = format!("{name}{{{labels}}} ");
        text.lines().find_map(|l| l.strip_prefix(&want)).map(|v| v.trim().parse().unwrap())
    }

    /// A backend without kernel counters (an L7 VIP's, which XDP does not count) gets its up and
    /// weight gauges but no XDP counter series; an XDP VIP's backend gets all of them.
    #[test]
    fn backends_without_kernel_counters_get_no_xdp_counter_series() {
        let m = Metrics::new();
        let backend = |vip: &str, backend: &str, counters| BackendSample {
            vip: vip.to_owned(),
            backend: backend.to_owned(),
            counters,
            up: true,
            weight: 1,
        };
        *m.kernel.lock().unwrap() = KernelSnapshot {
            vips: vec![("web".to_owned(), Counters::default())],
            backends: vec![
                backend("web", "198.18.0.11", Some(Counters::default())),
                backend("app", "198.18.0.11:80", None),
            ],
            ..KernelSnapshot::default()
        };
        let text = m.encode();
        for what in ["packets", "bytes", "new_flows"] {
            let name = format!("edgelb_backend_{what}_total");
            assert!(text.contains(&format!("{name}{{vip=\"web\",")), "{text}");
            assert!(!text.contains(&format!("{name}{{vip=\"app\",")), "{text}");
        }
        for gauge in ["edgelb_backend_up", "edgelb_backend_weight"] {
            assert_eq!(sample(&text, gauge, "vip=\"app\",backend=\"198.18.0.11:80\""), Some(1.0));
        }
    }

    /// Every health-checked backend has its transition and probe failure counters, and every
    /// L7 backend its ejection counter, at 0 from the start (and from a reload that adds it): a series that
    /// first appeared at its first increment would hide that increment from `increase()`, and
    /// the first flap of a backend would not show on the dashboard.
    #[test]
    fn counters_exist_at_zero_before_their_first_increment() {
        let m = Metrics::new();
        m.retain(&config(&[11], false));
        let text = m.encode();
        let transitions = "edgelb_backend_transitions_total";
        let ejections = "edgelb_l7_backend_ejections_total";
        for (vip, backend) in [("web", "198.18.0.11"), ("app", "198.18.0.11:80")] {
            let l = format!("vip=\"{vip}\",backend=\"{backend}\"");
            assert_eq!(sample(&text, FAILURES, &l), Some(0.0), "{text}");
            for to in ["up", "down"] {
                let series = format!("{l},to=\"{to}\"");
                assert_eq!(sample(&text, transitions, &series), Some(0.0), "{text}");
            }
        }
        let too_large = "edgelb_l7_response_heads_too_large_total";
        let app = "vip=\"app\",backend=\"198.18.0.11:80\"";
        assert_eq!(sample(&text, ejections, app), Some(0.0), "{text}");
        assert_eq!(sample(&text, too_large, app), Some(0.0), "{text}");
        // Only L7 backends have passive health, and response heads.
        assert_eq!(sample(&text, ejections, "vip=\"web\",backend=\"198.18.0.11\""), None);
        assert_eq!(sample(&text, too_large, "vip=\"web\",backend=\"198.18.0.11\""), None);

        // A backend a reload adds starts at 0 too; the others keep counting.
        m.transition("web", "198.18.0.11".into(), false);
        m.retain(&config(&[11, 12], false));
        let text = m.encode();
        let l = "vip=\"web\",backend=\"198.18.0.11\",to=\"down\"";
        assert_eq!(sample(&text, transitions, l), Some(1.0), "{text}");
        let l = "vip=\"web\",backend=\"198.18.0.12\",to=\"down\"";
        assert_eq!(sample(&text, transitions, l), Some(0.0), "{text}");
        let l = "vip=\"web\",backend=\"198.18.0.12\"";
        assert_eq!(sample(&text, FAILURES, l), Some(0.0), "{text}");
        let l = "vip=\"app\",backend=\"198.18.0.12:80\"";
        assert_eq!(sample(&text, ejections, l), Some(0.0), "{text}");
    }

    const FAILURES: &str = "edgelb_health_check_failures_total";

    /// A probe of `backend` of `vip` that failed: on the backend's side, or with `local`, on
    /// this node's.
    fn failed_probe(vip: &str, backend: &crate::config::Backend, local: bool) -> HealthEvent {
        HealthEvent {
            vip: vip.to_owned(),
            backend: SocketAddr::new(backend.address, backend.port),
            healthy: true,
            changed: false,
            latency: None,
            reason: String::new(),
            local_failure: local,
            check: 0,
        }
    }

    /// Every failed probe of a backend is counted, not only those that flip it (a backend
    /// failing fewer than `fall` in a row shows nowhere else); successes and this node's own
    /// failures are not.
    #[test]
    fn every_failed_probe_is_counted() {
        let m = Metrics::new();
        let cfg = config(&[11], false);
        m.retain(&cfg);
        let (vip, b) = (&cfg.vips[0], &cfg.vips[0].backends[0]);
        let ok = HealthEvent {
            latency: Some(Duration::from_millis(1)),
            ..failed_probe("web", b, false)
        };
        for _ in 0..3 {
            let labels = BackendLabels { vip: "web".into(), backend: backend_label(vip, b) };
            m.probed(&failed_probe("web", b, false), &labels);
            m.probed(&failed_probe("web", b, true), &labels);
            m.probed(&ok, &labels);
        }
        let text = m.encode();
        let l = "vip=\"web\",backend=\"198.18.0.11\"";
        assert_eq!(sample(&text, FAILURES, l), Some(3.0), "{text}");
        assert_eq!(sample(&text, "edgelb_health_check_duration_seconds_count", l), Some(3.0));
    }

    /// The help of `edgelb_xdp_attached` says what sets it to 0 as the controller decides it
    /// (`Dataplane::interface_states`): a deleted interface, not a renamed one, which XDP stays
    /// on. It once counted a rename among the losses, and an operator would have looked for a
    /// 0 that never comes.
    #[test]
    fn the_help_of_xdp_attached_keeps_a_renamed_interface_at_1() {
        let text = Metrics::new().encode();
        let help = text.lines().find(|l| l.starts_with("# HELP edgelb_xdp_attached "));
        let help = help.expect("the family is described");
        assert!(help.contains("0 once the interface was deleted"), "{help}");
        assert!(help.contains("a renamed interface stays 1"), "{help}");
    }

    /// The docs operators write alerts and queries from.
    const DOCS: [(&str, &str); 4] = [
        ("README.md", include_str!("../../../README.md")),
        ("docs/CONFIG.md", include_str!("../../../docs/CONFIG.md")),
        ("docs/ARCHITECTURE.md", include_str!("../../../docs/ARCHITECTURE.md")),
        ("docs/BENCHMARKS.md", include_str!("../../../docs/BENCHMARKS.md")),
    ];

    /// The values of every `name="value"` label in `text`.
    fn label_values<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let key = format!("{name}=\"");
        let mut out = Vec::new();
        for (at, _) in text.match_indices(&key) {
            // Only the whole label name: `xreason="` is another label.
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &text[at + key.len()..];
            out.push(rest.split('"').next().unwrap_or(rest));
        }
        out
    }

    /// Every `reason="..."` the docs name is a reason label /metrics exports (those of
    /// `edgelb_xdp_verdicts_total`, the only family with a `reason` label), every
    /// `action="...",reason="..."` pair a series of it, and no doc names an XDP verdict by its
    /// slot name (`drop_fragment`): /metrics splits a slot's name at its first `_` into `action`
    /// and `reason`, and the docs once wrote `reason="drop_fragment"`, which an alert would have
    /// copied to match nothing.
    #[test]
    fn the_docs_name_xdp_verdicts_as_metrics_label_them() {
        let m = Metrics::new();
        m.kernel.lock().unwrap().reasons = vec![0; REASON_NAMES.len()];
        let text = m.encode();
        let exported: HashSet<&str> = label_values(&text, "reason").into_iter().collect();
        assert_eq!(exported.len(), REASON_NAMES.len(), "{text}");
        let mut named = 0;
        for (doc, body) in DOCS {
            for reason in label_values(body, "reason") {
                named += 1;
                assert!(
                    exported.contains(reason),
                    "{doc}: reason=\"{reason}\" is no reason label /metrics exports: {exported:?}"
                );
            }
            for (at, key) in body.match_indices("action=\"") {
                let Some((action, rest)) = body[at + key.len()..].split_once('"') else { continue };
                let Some(rest) = rest.strip_prefix(",reason=\"") else { continue };
                let reason = rest.split('"').next().unwrap_or(rest);
                let series = format!(
                    "edgelb_xdp_verdicts_total{{action=\"{action}\",reason=\"{reason}\"}} "
                );
                assert!(text.contains(&series), "{doc}: no series {series}in\n{text}");
            }
            for slot in REASON_NAMES {
                let whole = body.match_indices(slot).any(|(at, _)| {
                    let word =
                        |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
                    !word(body[..at].chars().next_back())
                        && !word(body[at + slot.len()..].chars().next())
                });
                assert!(
                    !whole,
                    "{doc} names the XDP verdict slot {slot}, which /metrics labels {{action,reason}} \
                     split at the first _"
                );
            }
        }
        assert!(named > 0, "the docs name no reason at all: the test reads the wrong files");
    }

    /// The sample names /metrics exports: each family's, a counter's with `_total`, a
    /// histogram's with `_bucket`, `_sum` and `_count`.
    fn sample_names(text: &str) -> HashSet<String> {
        let mut out = HashSet::new();
        for l in text.lines() {
            let Some(rest) = l.strip_prefix("# TYPE ") else { continue };
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            match kind {
                "counter" => out.extend([format!("{name}_total")]),
                "histogram" => {
                    out.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")))
                }
                _ => out.extend([name.to_owned()]),
            }
        }
        out
    }

    /// Every query of contrib/grafana-dashboard.json names a metric /metrics exports, and the
    /// dashboard shows the states an operator alerts on (README): a VIP failing open, XDP lost
    /// from an interface, L7 backends out by passive health and the proxy failing open. It once
    /// showed none of them. It shows the L7 backends' requests in flight too, where a slow or
    /// stuck backend shows first, which it once left out.
    #[test]
    fn the_dashboard_queries_real_metrics_and_shows_what_to_alert_on() {
        // A family shows in /metrics once it has a series: give each one.
        let m = Metrics::new();
        m.retain(&config(&[11], false));
        let labels = BackendLabels { vip: "web".to_owned(), backend: "198.18.0.11".to_owned() };
        m.observe_probe(&labels, Duration::from_millis(1));
        let l7 = &m.l7;
        let vip = crate::proxy::VipLabel { vip: "app".to_owned() };
        let (app, class) = ("app".to_owned(), "2xx".to_owned());
        l7.requests.get_or_create(&crate::proxy::RequestLabels { vip: app.clone(), class }).inc();
        l7.duration.get_or_create(&vip).observe(Duration::from_millis(1));
        l7.active.get_or_create(&vip).inc();
        for family in [&l7.retries, &l7.fail_open, &l7.accept_errors, &l7.closed_for_room] {
            family.get_or_create(&vip).inc();
        }
        let outcome = "relayed".to_owned();
        l7.tcp_connections
            .get_or_create(&crate::proxy::TcpLabels { vip: app.clone(), outcome })
            .inc();
        for family in [&l7.responses_cut, &l7.request_bodies_cut] {
            let side = "client".to_owned();
            family.get_or_create(&crate::proxy::CutLabels { vip: app.clone(), side }).inc();
        }
        let names = sample_names(&m.encode());
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../contrib/grafana-dashboard.json"))
                .expect("the dashboard is JSON");
        let mut queried = HashSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            let title = &panel["title"];
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for (at, _) in expr.match_indices("edgelb_") {
                    let name: String = expr[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(names.contains(&name), "panel {title}: no metric {name}: {names:?}");
                    queried.insert(name);
                }
            }
        }
        for name in [
            "edgelb_vip_fail_open",
            "edgelb_xdp_attached",
            "edgelb_l7_backend_passive_down",
            "edgelb_l7_fail_open_total",
            "edgelb_l7_backend_in_flight",
        ] {
            assert!(queried.contains(name), "no panel shows {name}");
        }
    }

    /// Health checks that could not start show in their gauge, 0 while every check runs.
    #[test]
    fn missing_health_checks_are_exported() {
        let m = Metrics::new();
        let missing = |m: &Metrics| {
            m.encode()
                .lines()
                .find_map(|l| l.strip_prefix("edgelb_health_checks_missing ")?.parse::<i64>().ok())
        };
        assert_eq!(missing(&m), Some(0));
        m.checks_missing(3);
        assert_eq!(missing(&m), Some(3));
        m.checks_missing(0);
        assert_eq!(missing(&m), Some(0));
    }

    /// The build is a series of its own at 1, labelled with this build's version and commit.
    #[test]
    fn the_build_is_exported() {
        let text = Metrics::new().encode();
        let labels =
            format!("version=\"{}\",commit=\"{}\"", crate::build::VERSION, crate::build::COMMIT);
        assert_eq!(sample(&text, "edgelb_build_info", &labels), Some(1.0), "{text}");
        assert!(text.contains("# TYPE edgelb_build_info gauge\n"), "{text}");
    }

    /// Panics are counted from the start, at 0 in a scrape before the first (lib tests install
    /// no hook: nothing counts here).
    #[test]
    fn panics_are_exported_at_zero() {
        let text = Metrics::new().encode();
        assert!(text.lines().any(|l| l == "edgelb_panics_total 0"), "{text}");
    }

    /// After a reload, the series of the backends and VIPs it removed are gone (health checks
    /// and L7 alike), those of the backends it kept go on counting from where they were, and a
    /// request still running on a removed backend does not bring its series back.
    #[test]
    fn retain_removes_the_series_of_removed_backends_and_keeps_the_others() {
        let m = Metrics::new();
        let before = config(&[11, 12], true);
        for vip in &before.vips {
            for b in &vip.backends {
                let label = backend_label(vip, b);
                let labels = BackendLabels { vip: vip.name.clone(), backend: label.clone() };
                m.observe_probe(&labels, Duration::from_millis(2));
                m.probed(&failed_probe(&vip.name, b, false), &labels);
                m.transition(&vip.name, label.clone(), false);
                m.transition(&vip.name, label.clone(), true);
                m.transition(&vip.name, label, true);
            }
        }
        for h in [11, 12] {
            m.l7.eject("app", SocketAddr::from(([198, 18, 0, h], 80)));
            m.l7.head_too_large("app", SocketAddr::from(([198, 18, 0, h], 80)));
        }
        let text = m.encode();
        for gone in ["198.18.0.12", "198.18.0.12:80", "198.18.0.13"] {
            assert!(text.contains(&format!("backend=\"{gone}\"")), "{text}");
        }
        assert!(text.contains("vip=\"gone\""), "{text}");

        m.retain(&config(&[11], false));
        let text = m.encode();
        for gone in ["198.18.0.12", "198.18.0.12:80", "198.18.0.13"] {
            assert!(!text.contains(&format!("backend=\"{gone}\"")), "{gone} left:\n{text}");
        }
        assert!(!text.contains("vip=\"gone\""), "{text}");
        let duration = "edgelb_health_check_duration_seconds_count";
        let transitions = "edgelb_backend_transitions_total";
        let ejections = "edgelb_l7_backend_ejections_total";
        for (vip, backend) in [("web", "198.18.0.11"), ("app", "198.18.0.11:80")] {
            let l = format!("vip=\"{vip}\",backend=\"{backend}\"");
            assert_eq!(sample(&text, duration, &l), Some(1.0), "{text}");
            assert_eq!(sample(&text, FAILURES, &l), Some(1.0), "{text}");
            assert_eq!(sample(&text, transitions, &format!("{l},to=\"up\"")), Some(2.0));
            assert_eq!(sample(&text, transitions, &format!("{l},to=\"down\"")), Some(1.0));
        }
        let kept = "vip=\"app\",backend=\"198.18.0.11:80\"";
        assert_eq!(sample(&text, ejections, kept), Some(1.0), "{text}");
        let too_large = "edgelb_l7_response_heads_too_large_total";
        assert_eq!(sample(&text, too_large, kept), Some(1.0), "{text}");

        // Counting goes on; a removed backend, still failing a request of an older pool
        // snapshot, is not counted.
        m.transition("web", "198.18.0.11".into(), false);
        m.l7.eject("app", SocketAddr::from(([198, 18, 0, 11], 80)));
        m.l7.eject("app", SocketAddr::from(([198, 18, 0, 12], 80)));
        let text = m.encode();
        let down = "vip=\"web\",backend=\"198.18.0.11\",to=\"down\"";
        assert_eq!(sample(&text, transitions, down), Some(2.0), "{text}");
        assert_eq!(sample(&text, ejections, kept), Some(2.0), "{text}");
        assert!(!text.contains("198.18.0.12"), "{text}");

        // A backend added back starts new series.
        m.retain(&config(&[11, 12], false));
        m.transition("web", "198.18.0.12".into(), false);
        m.l7.eject("app", SocketAddr::from(([198, 18, 0, 12], 80)));
        let text = m.encode();
        let l = "vip=\"web\",backend=\"198.18.0.12\",to=\"down\"";
        assert_eq!(sample(&text, transitions, l), Some(1.0), "{text}");
        let l = "vip=\"app\",backend=\"198.18.0.12:80\"";
        assert_eq!(sample(&text, ejections, l), Some(1.0), "{text}");
        assert_eq!(sample(&text, ejections, kept), Some(2.0), "{text}");

        // A reload that takes `web`'s health check away removes its health series (no check
        // runs to move them: frozen, they would read as a check that sees no change); `app`'s,
        // still checked, go on.
        let mut unchecked = config(&[11, 12], false);
        unchecked.vips[0].health = None;
        m.retain(&unchecked);
        let text = m.encode();
        for name in [duration, transitions, FAILURES] {
            assert!(!text.contains(&format!("{name}{{vip=\"web\",")), "{name} of web:\n{text}");
        }
        let l = "vip=\"app\",backend=\"198.18.0.11:80\"";
        assert_eq!(sample(&text, duration, l), Some(1.0), "{text}");
        assert_eq!(sample(&text, FAILURES, l), Some(1.0), "{text}");
        assert_eq!(sample(&text, transitions, &format!("{l},to=\"up\"")), Some(2.0));
    }
}
