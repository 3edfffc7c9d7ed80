//! Prometheus text exposition (format 0.0.4) of the VMM's metrics plus the API server's own.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::responses::{MetricFamily, MetricKind, MetricsSnapshot};

/// Content type of `GET /metrics`.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counters the API server keeps about itself.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    /// (method, route, status) -> requests.
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
}

impl ApiMetrics {
    /// Counts one answered request, by its method, route pattern and status.
    pub fn record(&self, method: &'static str, route: &'static str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((method, route, status)).or_insert(0) += 1;
    }

    /// The server's families, to render after the VMM's.
    pub fn families(&self) -> Vec<MetricFamily> {
        let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let samples = map
            .iter()
            .map(
                |((method, route, status), n)| crate::responses::MetricSample {
                    labels: vec![
                        ("method".into(), (*method).into()),
                        ("route".into(), (*route).into()),
                        ("status".into(), status.to_string()),
                    ],
                    value: *n as f64,
                },
            )
            .collect();
        vec![MetricFamily {
            name: "vmm_api_requests_total".into(),
            help: "API requests answered, by method, route and HTTP status.".into(),
            kind: MetricKind::Counter,
            samples,
        }]
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn is_valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`.
pub fn is_valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// Renders the families. A family with an invalid name, a duplicate name, or a sample with an
/// invalid label name is left out (a VMM bug must not make the whole page unparsable); the
/// number left out is reported as `vmm_api_metrics_dropped`.
pub fn render(vmm: &MetricsSnapshot, api: &[MetricFamily]) -> String {
    let mut out = String::new();
    let mut seen = std::collections::HashSet::new();
    let mut dropped = 0u64;
    for family in vmm.families.iter().chain(api) {
        if !is_valid_metric_name(&family.name) || !seen.insert(family.name.as_str()) {
            dropped += 1;
            continue;
        }
        let kind = match family.kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {}", family.name, escape_help(&family.help));
        let _ = writeln!(out, "# TYPE {} {kind}", family.name);
        for sample in &family.samples {
            if !sample.labels.iter().all(|(k, _)| is_valid_label_name(k)) {
                dropped += 1;
                continue;
            }
            out.push_str(&family.name);
            if !sample.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in sample.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", format_value(sample.value));
        }
    }
    let _ = writeln!(
        out,
        "# HELP vmm_api_metrics_dropped Metric families or samples left out for invalid names.\n\
         # TYPE vmm_api_metrics_dropped gauge\nvmm_api_metrics_dropped {dropped}"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::responses::MetricSample;

    #[test]
    fn renders_labels_and_escapes() {
        let snap = MetricsSnapshot {
            families: vec![
                MetricFamily::single("vmm_balloon_actual_pages", "Pages.", MetricKind::Gauge, 3.0),
                MetricFamily {
                    name: "vmm_x_total".into(),
                    help: "a\nb".into(),
                    kind: MetricKind::Counter,
                    samples: vec![MetricSample {
                        labels: vec![("reason".into(), "q\"x".into())],
                        value: 1.5,
                    }],
                },
                MetricFamily::single("bad name", "", MetricKind::Gauge, 0.0),
            ],
        };
        let text = render(&snap, &[]);
        assert!(
            text.contains("# TYPE vmm_balloon_actual_pages gauge\nvmm_balloon_actual_pages 3\n")
        );
        assert!(text.contains("# HELP vmm_x_total a\\nb\n"));
        assert!(text.contains("vmm_x_total{reason=\"q\\\"x\"} 1.5\n"));
        assert!(!text.contains("bad name"));
        assert!(text.contains("vmm_api_metrics_dropped 1\n"));
    }

    #[test]
    fn api_counters_render() {
        let m = ApiMetrics::default();
        m.record("GET", "/balloon", 200);
        m.record("GET", "/balloon", 200);
        let text = render(&MetricsSnapshot::default(), &m.families());
        assert!(
            text.contains(
                "vmm_api_requests_total{method=\"GET\",route=\"/balloon\",status=\"200\"} 2\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn names() {
        assert!(is_valid_metric_name("a:b_c9"));
        assert!(!is_valid_metric_name("9a"));
        assert!(!is_valid_metric_name(""));
        assert!(is_valid_label_name("route"));
        assert!(!is_valid_label_name("__x"));
    }
}
