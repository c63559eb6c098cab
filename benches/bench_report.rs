//! The dataplane bench's reading of its load generators' output and its verdicts: what turns a
//! wrk or oha run into figures (or into no figure, when the run failed), the medians over
//! rounds, and "met" or "not met" for each target. `benches/dataplane.rs` includes this file as
//! a module; it is also the `bench_report` test target of lb-userspace (`cargo test -p
//! lb-userspace --test bench_report`), because the dataplane bench is a `harness = false`
//! binary: `cargo test` would run its `main`, the benchmarks themselves, not unit tests.
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

/// One of the targets, judged on a figure of this run: printed as a list item, "met" or
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
/// to connect" at start-up prints nothing on stdout and exits 1), gives no figure: every field
/// NaN and `failure` saying why, so that its round fails the targets judged on it.
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
    let pct = |p: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| wrk_ms(v.trim())))
            .unwrap_or(f64::NAN)
    };
    WrkFigures { rps, p50_ms: pct("50%"), p99_ms: pct("99%"), failure: None }
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
}
