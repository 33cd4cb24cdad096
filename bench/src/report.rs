//! Histograms (nanoseconds, 3 significant figures), the table, and the files
//! under `target/bench/`: `results.json` and one `.hgrm` percentile
//! distribution per latency measurement.
use std::{fmt::Write as _, fs, path::Path};

use anyhow::Context;
use base64::Engine;
use hdrhistogram::{
    serialization::{Deserializer, Serializer, V2Serializer},
    Histogram,
};
use serde_json::{json, Value};

/// A latency histogram: 1 ns to 100 s, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static bounds")
}

/// Serialized (V2, base64) for the trip from a worker.
pub fn encode(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut v = Vec::new();
    V2Serializer::new().serialize(h, &mut v).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(v))
}

/// The other end of [`encode`].
pub fn decode(s: &str) -> anyhow::Result<Histogram<u64>> {
    let raw = base64::engine::general_purpose::STANDARD.decode(s)?;
    Deserializer::new().deserialize(&mut &raw[..]).map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Percentiles in microseconds.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    let us = |v: u64| (v as f64 / 1000.0 * 10.0).round() / 10.0;
    json!({
        "count": h.len(),
        "p50_us": us(h.value_at_percentile(50.0)),
        "p90_us": us(h.value_at_percentile(90.0)),
        "p99_us": us(h.value_at_percentile(99.0)),
        "p99_9_us": us(h.value_at_percentile(99.9)),
        "max_us": us(h.max()),
    })
}

/// Writes `h` as an HdrHistogram percentile distribution (`.hgrm`, values
/// in microseconds) the usual plotters read.
pub fn write_hgrm(dir: &Path, name: &str, h: &Histogram<u64>) -> anyhow::Result<()> {
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    for v in h.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { format!("{:.2}", 1.0 / (1.0 - q)) } else { "inf".into() };
        let _ = writeln!(
            out,
            "{:12.3} {:14.12} {:10} {:>14}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inv
        );
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    );
    fs::create_dir_all(dir)?;
    fs::write(dir.join(format!("{name}.hgrm")), out).with_context(|| format!("writing {name}.hgrm"))
}

/// The proxies' CPU for one row: the data plane's and the haproxy pair's,
/// per unit of work.
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    /// `%·s/Gbit`, `µs/rt`, `µs/conn`, `µs/req`.
    pub unit: &'static str,
    /// The data plane(s).
    pub dataplane: f64,
    /// Both haproxy processes.
    pub haproxy: f64,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub workload: String,
    /// Figure without a proxy.
    pub direct: f64,
    /// Figure through the data plane.
    pub proxied: f64,
    /// Figure through the haproxy pair (NaN where not run).
    pub haproxy: f64,
    /// Unit of the figures.
    pub unit: &'static str,
    /// Whether larger is better (throughput) or smaller (latency, memory).
    pub higher_is_better: bool,
    /// The proxies' CPU, where measured.
    pub cpu: Option<Cpu>,
}

impl Row {
    /// proxied / direct.
    pub fn ratio(&self) -> f64 {
        if self.direct == 0.0 {
            f64::NAN
        } else {
            self.proxied / self.direct
        }
    }

    /// proxied / haproxy.
    pub fn vs_haproxy(&self) -> f64 {
        if self.haproxy == 0.0 {
            f64::NAN
        } else {
            self.proxied / self.haproxy
        }
    }
}

/// The table, as text.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<42} {:>13} {:>13} {:>13} {:>7} {:>7}  {:<24}\n",
        "workload", "direct", "data plane", "haproxy", "/direct", "/hapx", "CPU: data plane | haproxy"
    );
    let num = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.2}") };
    for r in rows {
        let fmt = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.1} {}", r.unit) };
        let one = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.1}") };
        let cpu = r.cpu.map_or(String::new(), |c| format!("{} | {} {}", one(c.dataplane), one(c.haproxy), c.unit));
        let _ = writeln!(
            out,
            "{:<42} {:>13} {:>13} {:>13} {:>7} {:>7}  {cpu}",
            r.workload,
            fmt(r.direct),
            fmt(r.proxied),
            fmt(r.haproxy),
            num(r.ratio()),
            num(r.vs_haproxy())
        );
    }
    out
}

/// The rows as JSON.
pub fn rows_json(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "workload": r.workload, "direct": r.direct, "data_plane": r.proxied, "haproxy": r.haproxy,
                    "unit": r.unit, "ratio": r.ratio(), "vs_haproxy": r.vs_haproxy(),
                    "higher_is_better": r.higher_is_better,
                    "cpu": r.cpu.map(|c| json!({ "unit": c.unit, "data_plane": c.dataplane, "haproxy": c.haproxy })),
                })
            })
            .collect(),
    )
}
