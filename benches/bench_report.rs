//! The dataplane bench's reading of its load generators' output and its verdicts: what turns a
//! wrk or oha run into figures (or into no figure, when the run failed), the medians over
//! rounds, and "met" or "not met" for each target. `benches/dataplane.rs` includes this file as
//! a module; it is also the `bench_report` test target of lb-userspace (`cargo test -p
//! lb-userspace --test bench_report`, and in `./x test`), because the dataplane bench is a
//! `harness = false` binary: `cargo test --bench dataplane` compiles no `#[test]` in it (though
//! `cfg(test)` is set) and runs its `main`, the benchmarks themselves.
//!
//! Nothing here measures or starts anything: it only reads text and JSON, so every rule of
//! judgement the bench applies is tested here without root, wrk or oha.

use serde_json::{Value, json};

/// The median; of an even count, the mean of the middle two. NaN if any value is not finite
/// (a run that gave no figure), so that a failed run fails the target judged on it instead of
/// being left out of it.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// [`median`] of the per-round figures `v` (a JSON array) kept in the results: a round whose
/// figure was not finite is null there, NaN here, which fails the target judged on it rather
/// than dropping out of it.
pub fn median_of_json(v: &Value) -> f64 {
    let rounds = v.as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect());
    median(rounds.unwrap_or_default())
}

/// One of the issue's targets, judged on a figure of this run: printed as a list item, "met" or
/// "not met" with the figure, and returned for results.json. A NaN figure (a run that gave none,
/// or a median over rounds one of which gave none) is "not met (no figure)": a target is met
/// only on a figure that shows it, never by a run that failed.
pub fn target(what: &str, figure: f64, shown: &str, goal: &str, met: bool) -> Value {
    let met = met && !figure.is_nan();
    let verdict = if figure.is_nan() {
        "not met (no figure)"
    } else if met {
        "met"
    } else {
        "not met"
    };
    println!("- {what}: {shown} (target {goal}): **{verdict}**");
    json!({ "figure": figure, "target": goal, "met": met })
}

/// What one wrk run gave: requests/s and the p50 and p99 latencies (ms).
#[derive(Debug, Clone, PartialEq)]
pub struct WrkFigures {
    /// Requests per second, wrk's `Requests/sec:` line.
    pub rps: f64,
    /// Median latency, ms (`--latency`'s `50%` line).
    pub p50_ms: f64,
    /// 99th percentile latency, ms (`--latency`'s `99%` line).
    pub p99_ms: f64,
    /// Why the run gave no figure, when it gave none.
    pub failure: Option<String>,
}

/// A latency as wrk prints it (`972.00us`, `1.02ms`, `1.20s`), in ms; NaN if unreadable.
fn wrk_ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

/// Reads a `wrk --latency` run from its standard output and error and whether it exited with
/// success. A run that exited with an error, or printed no `Requests/sec:` line (wrk's "unable
/// to connect" at start-up prints nothing on stdout and exits 1), or that counted socket errors
/// or responses of status 400 or more, gives no figure: every field NaN and `failure` saying
/// why, so that its round fails the targets judged on it.
pub fn parse_wrk(stdout: &str, stderr: &str, exit_ok: bool) -> WrkFigures {
    let said = || {
        let first = stderr.lines().map(str::trim).find(|l| !l.is_empty());
        first.map(|l| format!(": {l}")).unwrap_or_default()
    };
    let no_figure = |why: String| WrkFigures {
        rps: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        failure: Some(why),
    };
    if !exit_ok {
        return no_figure(format!("wrk exited with an error{}", said()));
    }
    let rps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok());
    let Some(rps) = rps else {
        return no_figure(format!("wrk printed no Requests/sec line{}", said()));
    };
    // wrk counts a response of status 400 or more in Requests/sec and its percentiles, and
    // leaves out the requests its socket errors (connections refused, reset, timed out) cost,
    // printing each count only when it is not 0: a proxy answering errors fast, or dropping
    // connections, would show better figures. A run with either gives no figure.
    let errors: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| {
            let count = |n: &str| n.trim().parse::<u64>().unwrap_or(1);
            if let Some(counts) = l.strip_prefix("Socket errors:") {
                // "connect 0, read 12, write 0, timeout 0"
                counts
                    .split(',')
                    .map(|c| count(c.split_whitespace().nth(1).unwrap_or("")))
                    .sum::<u64>()
                    > 0
            } else if let Some(n) = l.strip_prefix("Non-2xx or 3xx responses:") {
                count(n) > 0
            } else {
                false
            }
        })
        .collect();
    if !errors.is_empty() {
        return no_figure(errors.join("; "));
    }
    let pct = |p: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| wrk_ms(v.trim())))
            .unwrap_or(f64::NAN)
    };
    WrkFigures { rps, p50_ms: pct("50%"), p99_ms: pct("99%"), failure: None }
}

/// What one oha run gave: the p50 and p99 latencies (ms) at the fixed rate.
#[derive(Debug, Clone, PartialEq)]
pub struct OhaFigures {
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Why the run gave no figure, when it gave none.
    pub failure: Option<String>,
}

/// Reads an `oha --output-format json` run (oha 1.16) from its standard output and error and
/// whether it exited with success. oha's latency percentiles cover every response whatever its
/// status, and it counts a response of any status as a success: a run whose `successRate` is
/// below 1 (requests that got no response, less those cut off by the end of `-z`) or with any
/// status other than 200 gives no figure (NaN, and `failure` saying why), so that a proxy
/// answering errors fast cannot show a better p99.
pub fn parse_oha(stdout: &[u8], stderr: &str, exit_ok: bool) -> OhaFigures {
    let no_figure =
        |why: String| OhaFigures { p50_ms: f64::NAN, p99_ms: f64::NAN, failure: Some(why) };
    if !exit_ok {
        let said = stderr.lines().map(str::trim).find(|l| !l.is_empty());
        return no_figure(format!(
            "oha exited with an error{}",
            said.map(|l| format!(": {l}")).unwrap_or_default()
        ));
    }
    let Ok(v) = serde_json::from_slice::<Value>(stdout) else {
        return no_figure("oha printed no JSON".to_owned());
    };
    let rate = v["summary"]["successRate"].as_f64();
    if rate != Some(1.0) {
        return no_figure(format!(
            "successRate {} (errors: {})",
            rate.map_or("null".to_owned(), |r| r.to_string()),
            v["errorDistribution"]
        ));
    }
    let statuses = v["statusCodeDistribution"].as_object();
    if !statuses.is_some_and(|s| !s.is_empty() && s.keys().all(|k| k == "200")) {
        return no_figure(format!(
            "responses other than 200 OK (statuses: {})",
            v["statusCodeDistribution"]
        ));
    }
    let p = |q: &str| v["latencyPercentiles"][q].as_f64().map(|s| s * 1000.0);
    match (p("p50"), p("p99")) {
        (Some(p50_ms), Some(p99_ms)) => OhaFigures { p50_ms, p99_ms, failure: None },
        _ => no_figure("oha's JSON has no latencyPercentiles p50 and p99".to_owned()),
    }
}

/// The l7 part's targets, edgelb against HAProxy, judged on the figures `out` holds (the part's
/// section of results.json): at each of `conns` concurrencies requests per CPU-second, requests/s
/// and p99, each on the median of its per-round ratios; and, when oha ran at `rate` req/s
/// (`None`: not installed), the fixed-rate p99. Printed as a list and returned for `targets`.
pub fn l7_targets(out: &Value, conns: &[u32], rate: Option<u32>) -> Value {
    println!("\nTargets (edgelb against HAProxy, at each concurrency):\n");
    let mut targets = json!({});
    for &conns in conns {
        let c = &out[format!("c{conns}")];
        let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
        let ratio = |k: &str| median_of_json(&c["x_haproxy_rounds"][k]);
        let per_cpu = ratio("req_per_cpu_s");
        targets[format!("c{conns}_req_per_cpu_s_x_haproxy")] = target(
            &format!(
                "c{conns}: requests per CPU-second, edgelb / HAProxy (median of per-round ratios)"
            ),
            per_cpu,
            &format!(
                "{per_cpu:.2}× (medians {:.0} against {:.0})",
                f("edgelb_req_per_cpu_s"),
                f("haproxy_req_per_cpu_s")
            ),
            "≥ 1.3×",
            per_cpu >= 1.3,
        );
        let rps = ratio("rps");
        targets[format!("c{conns}_rps_x_haproxy")] = target(
            &format!("c{conns}: requests/s, edgelb / HAProxy (median of per-round ratios)"),
            rps,
            &format!("{rps:.2}× (medians {:.0} against {:.0})", f("edgelb_rps"), f("haproxy_rps")),
            "≥ 1× (no lower)",
            rps >= 1.0,
        );
        let p99 = ratio("p99");
        targets[format!("c{conns}_p99_x_haproxy")] = target(
            &format!("c{conns}: p99, edgelb / HAProxy (median of per-round ratios)"),
            p99,
            &format!(
                "{p99:.2}× (medians {:.2} against {:.2} ms)",
                f("edgelb_p99_ms"),
                f("haproxy_p99_ms")
            ),
            "≤ 1× (no worse)",
            p99 <= 1.0,
        );
    }
    // Judged whenever oha ran: a round without a figure makes the median NaN (null in the
    // JSON), which is "not met (no figure)", not a reason to leave the target out.
    if let Some(rate) = rate {
        let f = |who: &str| out["fixed_rate"][who]["p99_ms"].as_f64().unwrap_or(f64::NAN);
        let p99 = median_of_json(&out["fixed_rate"]["p99_x_haproxy_rounds"]);
        targets["fixed_rate_p99_x_haproxy"] = target(
            &format!("fixed {rate} req/s: p99, edgelb / HAProxy (median of per-round ratios)"),
            p99,
            &format!("{p99:.2}× (medians {:.2} against {:.2} ms)", f("edgelb"), f("haproxy")),
            "≤ 1× (no worse)",
            p99 <= 1.0,
        );
    }
    println!();
    targets
}

/// Puts the xdp part's ns per path into its section of results.json, each path under its own
/// name in `names` (the issue's keys: `new_flow_v4`, `conntrack_hit_v4`, ...), from the
/// single-run medians `raw_ns` and the per-run overhead measured in the same run. Under the
/// path's own key, and under `corrected_ns`, is the corrected figure (single run less the
/// overhead), the one the targets are judged on; a raw single run carries the ~55-60 ns overhead
/// of the run itself, the baselines too, so it is kept apart, under `raw_single_run_ns`.
pub fn xdp_path_ns(section: &mut Value, names: &[&str], raw_ns: &[f64], overhead_ns: f64) {
    for (name, raw) in names.iter().zip(raw_ns) {
        let corrected = raw - overhead_ns;
        section[*name] = json!(corrected);
        section["corrected_ns"][*name] = json!(corrected);
        section["raw_single_run_ns"][*name] = json!(raw);
    }
}

/// What a frame costs through `subject` beyond what it costs through `baseline`, in ns, from
/// their packet rates (Mpps): 1/subject - 1/baseline. In the veth part one CPU spends every
/// frame's time on the generator, both veth hops and the sink as well as on the XDP program,
/// the same in both runs, and that shared time pulls the rate ratio towards 1; this difference
/// is the program's own extra cost per frame, which that shared time does not dilute.
pub fn extra_ns_per_frame(subject_mpps: f64, baseline_mpps: f64) -> f64 {
    1e3 / subject_mpps - 1e3 / baseline_mpps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clean `wrk -t1 -c64 -d2s --latency` run (wrk 4.1, Debian 12).
    const WRK_CLEAN: &str = "Running 2s test @ http://127.0.0.1:18081/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  312.45us   9.87ms   89.12%
    Req/Sec    63.12k     2.01k   66.40k    75.00%
  Latency Distribution
     50%  972.00us
     75%    1.10ms
     90%    1.31ms
     99%    2.15ms
  125612 requests in 2.00s, 18.33MB read
Requests/sec:  62790.41
Transfer/sec:      9.16MB
";

    #[test]
    fn wrk_clean_run_gives_its_figures() {
        let f = parse_wrk(WRK_CLEAN, "", true);
        assert_eq!(f.failure, None);
        assert_eq!(f.rps, 62790.41);
        assert_eq!(f.p50_ms, 0.972);
        assert_eq!(f.p99_ms, 2.15);
    }

    /// What wrk prints when nothing accepts on the port (its start-up connect fails): nothing on
    /// stdout, the reason on stderr, exit status 1.
    #[test]
    fn wrk_unable_to_connect_gives_no_figure() {
        let f = parse_wrk("", "unable to connect to 127.0.0.1:18081 Connection refused\n", false);
        assert!(f.rps.is_nan(), "rps {}", f.rps);
        assert!(f.p50_ms.is_nan() && f.p99_ms.is_nan());
        let why = f.failure.expect("a failure");
        assert!(why.contains("Connection refused"), "{why}");
    }

    /// A run that printed its figures but exited with an error is not trusted either.
    #[test]
    fn wrk_failed_exit_gives_no_figure() {
        let f = parse_wrk(WRK_CLEAN, "", false);
        assert!(f.rps.is_nan() && f.p99_ms.is_nan());
        assert!(f.failure.is_some());
    }

    /// The finding's case: one failed edgelb round among five must not be outvoted by the
    /// median, and NaN is judged "not met", never left unjudged.
    #[test]
    fn failed_round_fails_the_target() {
        let failed =
            parse_wrk("", "unable to connect to 127.0.0.1:18081 Connection refused\n", false);
        let rounds = vec![failed.rps / 50_000.0, 1.31, 1.33, 1.35, 1.40];
        let ratio = median(rounds.clone());
        assert!(ratio.is_nan(), "median {ratio} of {rounds:?}");
        let t = target("per CPU-second", ratio, &format!("{ratio:.2}×"), "≥ 1.3×", ratio >= 1.3);
        assert_eq!(t["met"], json!(false));
        assert_eq!(t["figure"], Value::Null);
        // Through the JSON the bench keeps the rounds in, too.
        let kept = json!(rounds);
        assert!(median_of_json(&kept).is_nan());
    }

    /// A run through a proxy that dropped connections and answered errors (wrk prints these
    /// lines only when their counts are not all 0).
    const WRK_ERRORS: &str = "Running 2s test @ http://127.0.0.1:18081/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.00us  112.45us   3.87ms   89.12%
    Req/Sec    90.12k     2.01k   96.40k    75.00%
  Latency Distribution
     50%  402.00us
     75%  460.00us
     90%  530.00us
     99%    1.15ms
  180224 requests in 2.00s, 18.33MB read
  Socket errors: connect 0, read 12, write 0, timeout 0
  Non-2xx or 3xx responses: 179000
Requests/sec:  90112.00
Transfer/sec:      9.16MB
";

    #[test]
    fn wrk_errors_give_no_figure_and_say_both() {
        let f = parse_wrk(WRK_ERRORS, "", true);
        assert!(f.rps.is_nan() && f.p50_ms.is_nan() && f.p99_ms.is_nan(), "{f:?}");
        let why = f.failure.expect("a failure");
        assert!(why.contains("Socket errors: connect 0, read 12"), "{why}");
        assert!(why.contains("Non-2xx or 3xx responses: 179000"), "{why}");
    }

    #[test]
    fn wrk_non_2xx_alone_gives_no_figure() {
        let text =
            WRK_ERRORS.replace("  Socket errors: connect 0, read 12, write 0, timeout 0\n", "");
        let f = parse_wrk(&text, "", true);
        assert!(f.rps.is_nan(), "{f:?}");
        assert!(f.failure.expect("a failure").contains("Non-2xx"));
        let text = WRK_ERRORS.replace("  Non-2xx or 3xx responses: 179000\n", "");
        let f = parse_wrk(&text, "", true);
        assert!(f.rps.is_nan(), "{f:?}");
        assert!(f.failure.expect("a failure").contains("Socket errors"));
    }

    /// An `oha --output-format json` run at a fixed rate (oha 1.16; fields the bench does not
    /// read left out). Requests still in flight when `-z` ends are "aborted due to deadline",
    /// which oha leaves out of successRate.
    fn oha_json(success_rate: &str, statuses: &str, errors: &str) -> Vec<u8> {
        format!(
            r#"{{"summary":{{"successRate":{success_rate},"total":3.0,"slowest":0.012,"fastest":0.0001,"average":0.0008,"requestsPerSec":19998.2,"totalData":179982,"sizePerRequest":3,"sizePerSec":59994.0}},
            "latencyPercentiles":{{"p10":0.0004,"p25":0.0005,"p50":0.0007,"p75":0.0009,"p90":0.0012,"p95":0.0015,"p99":0.0031,"p99.9":0.006,"p99.99":0.009}},
            "statusCodeDistribution":{statuses},"errorDistribution":{errors}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn oha_clean_run_gives_its_figures() {
        let out = oha_json("1.0", r#"{"200":59994}"#, r#"{"aborted due to deadline":6}"#);
        let f = parse_oha(&out, "", true);
        assert_eq!(f.failure, None);
        assert_eq!(f.p50_ms, 0.7);
        assert_eq!(f.p99_ms, 3.1);
    }

    #[test]
    fn oha_errors_give_no_figure() {
        // Connections refused or reset: successRate below 1.
        let out = oha_json(
            "0.9",
            r#"{"200":54000}"#,
            r#"{"connection closed before message completed":6000}"#,
        );
        let f = parse_oha(&out, "", true);
        assert!(f.p50_ms.is_nan() && f.p99_ms.is_nan(), "{f:?}");
        assert!(f.failure.expect("a failure").contains("successRate"));
        // Fast 502s count as successes in oha and in its percentiles.
        let out = oha_json("1.0", r#"{"200":30000,"502":29994}"#, "{}");
        let f = parse_oha(&out, "", true);
        assert!(f.p99_ms.is_nan(), "{f:?}");
        assert!(f.failure.expect("a failure").contains("502"));
        // No response at all: oha's 0/0 successRate is NaN, null in its JSON.
        let out = oha_json("null", "{}", r#"{"connection refused":64}"#);
        assert!(parse_oha(&out, "", true).p99_ms.is_nan());
        // oha failed outright.
        let f = parse_oha(b"", "error: invalid value 'x' for '-q'", false);
        assert!(f.p99_ms.is_nan());
        assert!(f.failure.expect("a failure").contains("invalid value"));
    }

    /// The l7 section as the bench builds it, with every figure 1.2 against 1.0 and every round
    /// of `fixed` (edgelb / HAProxy fixed-rate p99 ratios) as given: a NaN round is null there.
    fn l7_section(fixed: &[f64]) -> Value {
        let mut out = json!({});
        for c in ["c64", "c256"] {
            out[c] = json!({
                "edgelb_req_per_cpu_s": 60_000.0, "haproxy_req_per_cpu_s": 40_000.0,
                "edgelb_rps": 60_000.0, "haproxy_rps": 50_000.0,
                "edgelb_p99_ms": 2.0, "haproxy_p99_ms": 2.5,
                "x_haproxy_rounds": {"req_per_cpu_s": [1.5, 1.5, 1.5, 1.5, 1.5], "rps": [1.2, 1.2, 1.2, 1.2, 1.2], "p99": [0.8, 0.8, 0.8, 0.8, 0.8]},
            });
        }
        let p99 = |ms: f64| fixed.iter().map(|r| r * ms).collect::<Vec<_>>();
        out["fixed_rate"]["edgelb"] =
            json!({"p99_ms": median(p99(3.0)), "p99_ms_rounds": p99(3.0)});
        out["fixed_rate"]["haproxy"] =
            json!({"p99_ms": 3.0, "p99_ms_rounds": [3.0, 3.0, 3.0, 3.0, 3.0]});
        out["fixed_rate"]["p99_x_haproxy_rounds"] = json!(fixed);
        out
    }

    #[test]
    fn l7_targets_judge_every_target() {
        let t = l7_targets(&l7_section(&[0.9; 5]), &[64, 256], Some(20_000));
        for c in ["c64", "c256"] {
            for k in ["req_per_cpu_s", "rps", "p99"] {
                assert_eq!(t[format!("{c}_{k}_x_haproxy")]["met"], json!(true), "{c} {k}: {t}");
            }
        }
        assert_eq!(t["fixed_rate_p99_x_haproxy"]["met"], json!(true), "{t}");
        assert_eq!(t["fixed_rate_p99_x_haproxy"]["figure"], json!(0.9));
    }

    /// The finding's case: one oha round without a figure made edgelb's median p99 NaN (null in
    /// the JSON), and the fixed-rate target was left out as if oha had not run.
    #[test]
    fn l7_fixed_rate_round_without_figure_is_not_met() {
        let out = l7_section(&[0.9, f64::NAN, 0.8, 0.9, 0.95]);
        assert_eq!(out["fixed_rate"]["edgelb"]["p99_ms"], Value::Null);
        let t = l7_targets(&out, &[64, 256], Some(20_000));
        let fixed = &t["fixed_rate_p99_x_haproxy"];
        assert_eq!(fixed["met"], json!(false), "{t}");
        assert_eq!(fixed["figure"], Value::Null);
        // Without oha there is no such target at all.
        let t = l7_targets(&out, &[64, 256], None);
        assert!(t.get("fixed_rate_p99_x_haproxy").is_none(), "{t}");
    }

    /// The issue's keys hold the figures the targets are judged on: single run less the per-run
    /// overhead. The raw single-run medians are kept beside them.
    #[test]
    fn xdp_issue_keys_hold_the_corrected_ns() {
        let names = ["trivial_pass", "trivial_tx", "new_flow_v4", "conntrack_hit_v4"];
        let (raw, overhead) = ([78.0, 80.0, 190.0, 160.0], 57.0);
        let mut section = json!({"per_run_overhead_ns": overhead});
        xdp_path_ns(&mut section, &names, &raw, overhead);
        assert_eq!(section["new_flow_v4"], json!(133.0), "{section}");
        assert_eq!(section["conntrack_hit_v4"], json!(103.0));
        assert_eq!(section["trivial_tx"], json!(23.0));
        assert_eq!(section["corrected_ns"]["new_flow_v4"], json!(133.0));
        assert_eq!(section["raw_single_run_ns"]["new_flow_v4"], json!(190.0));
        assert_eq!(section["raw_single_run_ns"]["trivial_pass"], json!(78.0));
    }

    #[test]
    fn extra_ns_per_frame_is_the_difference_of_frame_times() {
        // 4 Mpps is 250 ns a frame, 5 Mpps 200 ns: 50 ns more, whatever share of the 200 ns the
        // generator and sink take.
        assert_eq!(extra_ns_per_frame(4.0, 5.0), 50.0);
        assert_eq!(extra_ns_per_frame(5.0, 5.0), 0.0);
        assert!(extra_ns_per_frame(f64::NAN, 5.0).is_nan());
    }
}
