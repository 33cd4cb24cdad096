//! The SIGUSR1 dump: the merged measurements as a readable summary in the log
//! and, with `--stats-dir`, as files:
//!
//! - `dump-<unix ms>.json`: counters and, per histogram, count, min, p50,
//!   p90, p99, p99.9 and max in microseconds (`latest.json` is a copy);
//! - `dump-<unix ms>.hlog`: the histograms in HdrHistogram's interval-log
//!   format (V2 compressed, base64, tagged by name, values in microseconds),
//!   which HdrHistogram's own tools read (`latest.hlog` is a copy).
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hdrhistogram::{
    serialization::{interval_log, V2DeflateSerializer},
    Histogram,
};
use serde_json::{json, Value};
use tracing::info;

use crate::proxy::stats::{Direction, FlowCount, Hist, Snapshot};
use dataplane_common::maps::StatIndex;

/// Percentiles reported for every histogram.
pub const PERCENTILES: [(&str, f64); 4] = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9)];

fn summary(h: &Histogram<u64>) -> Value {
    let mut v = json!({ "count": h.len(), "min_us": h.min(), "max_us": h.max() });
    for (name, p) in PERCENTILES {
        v[format!("{name}_us")] = json!(h.value_at_percentile(p));
    }
    v
}

/// The JSON document of a dump.
pub fn to_json(stats: &Snapshot, bpf: &[(StatIndex, u64)], at: SystemTime) -> Value {
    let flow = |d: Direction| {
        let f = stats.flow(d);
        let mut v: serde_json::Map<String, Value> =
            FlowCount::ALL.iter().filter_map(|c| Some((c.json_key()?.to_string(), json!(f[*c])))).collect();
        v.insert("active".into(), json!(f.active()));
        Value::Object(v)
    };
    let failures: Vec<Value> = stats
        .failures
        .iter()
        .map(|((d, b, r), n)| json!({ "direction": d.to_string(), "side": b.to_string(), "reason": r.label(), "count": n }))
        .collect();
    let histograms: serde_json::Map<String, Value> =
        Hist::ALL.iter().map(|h| (h.name().to_string(), summary(&stats.hist[*h as usize]))).collect();
    let bpf: serde_json::Map<String, Value> = bpf.iter().map(|(i, n)| (i.name().to_string(), json!(n))).collect();
    json!({
        "unix_ms": at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
        "outbound": flow(Direction::Outbound),
        "inbound": flow(Direction::Inbound),
        "failures": failures,
        "histograms": histograms,
        "bpf_decisions": bpf,
    })
}

/// Logs the summary and, if `dir` is set, writes the files. Returns the JSON
/// path written.
pub fn dump(
    stats: &Snapshot,
    bpf: &[(StatIndex, u64)],
    dir: Option<&Path>,
    since: SystemTime,
) -> std::io::Result<Option<PathBuf>> {
    let at = SystemTime::now();
    info!(
        outbound_accepted = stats.flow(Direction::Outbound)[FlowCount::Accepted],
        outbound_active = stats.flow(Direction::Outbound).active(),
        outbound_failed = stats.flow(Direction::Outbound)[FlowCount::Failed],
        inbound_accepted = stats.flow(Direction::Inbound)[FlowCount::Accepted],
        inbound_failed = stats.flow(Direction::Inbound)[FlowCount::Failed],
        "stats dump"
    );
    for h in Hist::ALL {
        let x = &stats.hist[h as usize];
        info!(
            histogram = h.name(),
            count = x.len(),
            min_us = x.min(),
            p50_us = x.value_at_percentile(50.0),
            p90_us = x.value_at_percentile(90.0),
            p99_us = x.value_at_percentile(99.0),
            p99_9_us = x.value_at_percentile(99.9),
            max_us = x.max(),
            "latency"
        );
    }
    let Some(dir) = dir else { return Ok(None) };
    fs::create_dir_all(dir)?;
    let ms = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let json_path = dir.join(format!("dump-{ms}.json"));
    let doc = serde_json::to_vec_pretty(&to_json(stats, bpf, at)).map_err(std::io::Error::other)?;
    write_atomic(&json_path, &doc)?;
    write_atomic(&dir.join("latest.json"), &doc)?;

    let log = hlog(stats, since, at)?;
    write_atomic(&dir.join(format!("dump-{ms}.hlog")), &log)?;
    write_atomic(&dir.join("latest.hlog"), &log)?;
    info!(path = %json_path.display(), "stats written");
    Ok(Some(json_path))
}

/// The histograms as one interval log, one tagged interval per histogram,
/// covering `since` to `at`.
pub fn hlog(stats: &Snapshot, since: SystemTime, at: SystemTime) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut ser = V2DeflateSerializer::new();
    let start = since.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut w = interval_log::IntervalLogWriterBuilder::new()
        .add_comment("dataplane latency histograms, values in microseconds")
        .with_start_time(since)
        .with_base_time(since)
        .begin_log_with(&mut out, &mut ser)?;
    let span = at.duration_since(since).unwrap_or(Duration::ZERO);
    for h in Hist::ALL {
        let tag = interval_log::Tag::new(h.name()).ok_or_else(|| std::io::Error::other("bad tag"))?;
        w.write_histogram(&stats.hist[h as usize], Duration::ZERO, span, Some(tag))
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    }
    let _ = start;
    drop(w);
    Ok(out)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    #[test]
    fn the_log_decodes_with_hdrhistogram_itself() {
        let mut s = Snapshot::default();
        for ms in 1..=100 {
            s.record(Hist::Lifetime, Duration::from_millis(ms));
        }
        s.record(Hist::TlsHandshake, Duration::from_micros(700));
        s.record(Hist::InboundTlsHandshake, Duration::from_micros(800));
        s.record(Hist::InboundTlsHandshake, Duration::from_micros(900));
        let since = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let log = hlog(&s, since, since + Duration::from_secs(5)).expect("log");
        let text = String::from_utf8(log).expect("text");
        let mut found = 0;
        for entry in IntervalLogIterator::new(text.as_bytes()) {
            if let Ok(LogEntry::Interval(h)) = entry {
                let decoded: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
                    .deserialize(&mut &base64_decode(h.encoded_histogram())[..])
                    .expect("V2 histogram decodes");
                match h.tag().map(|t| t.as_str()) {
                    Some("connection_lifetime") => assert_eq!(decoded.len(), 100),
                    Some("tls_handshake") => assert_eq!(decoded.len(), 1),
                    Some("inbound_tls_handshake") => assert_eq!(decoded.len(), 2),
                    _ => assert_eq!(decoded.len(), 0),
                }
                found += 1;
            }
        }
        assert_eq!(found, Hist::ALL.len(), "{text}");
        let doc = to_json(&s, &[(StatIndex::Captured, 3)], since);
        assert_eq!(doc["histograms"]["connection_lifetime"]["count"], 100);
        assert_eq!(doc["histograms"]["inbound_tls_handshake"]["count"], 2);
        assert_eq!(doc["bpf_decisions"]["captured"], 3);
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
    }
}
