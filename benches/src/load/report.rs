//! A scenario's result: one table for people, one flat JSON object for
//! scripts.

use hdrhistogram::Histogram;
use serde_json::{Map, Value};

use super::proc::Sample;

#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: String,
    pub title: String,
    rows: Vec<(String, String, String)>,
    json: Map<String, Value>,
}

fn group(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_owned(), format!(".{f}")),
        None => (s.clone(), String::new()),
    };
    let (sign, digits) = match int.strip_prefix('-') {
        Some(d) => ("-", d.to_owned()),
        None => ("", int),
    };
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}{frac}")
}

impl Report {
    pub fn new(scenario: &str, title: impl Into<String>) -> Self {
        let mut json = Map::new();
        json.insert("scenario".into(), scenario.into());
        Report {
            scenario: scenario.into(),
            title: title.into(),
            rows: Vec::new(),
            json,
        }
    }

    /// A number: `key` in JSON, `label` and `unit` in the table.
    pub fn num(&mut self, key: &str, label: &str, value: f64, unit: &str) -> &mut Self {
        let decimals = if value.abs() >= 100.0 || value == value.trunc() {
            0
        } else if value.abs() >= 1.0 {
            2
        } else {
            4
        };
        self.rows
            .push((label.into(), group(value, decimals), unit.into()));
        let v = if value == value.trunc() && value.abs() < 9e15 {
            Value::from(value as i64)
        } else {
            serde_json::Number::from_f64(value)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        };
        self.json.insert(key.into(), v);
        self
    }

    /// A value that is not a number.
    pub fn text(&mut self, key: &str, label: &str, value: &str) -> &mut Self {
        self.rows.push((label.into(), value.into(), String::new()));
        self.json.insert(key.into(), value.into());
        self
    }

    /// `{prefix}p50_us`, p99, p99.9 and max of a histogram in µs.
    pub fn latency(&mut self, prefix: &str, what: &str, h: &Histogram<u64>) -> &mut Self {
        for (q, k, l) in [
            (0.5, "p50_us", "p50"),
            (0.99, "p99_us", "p99"),
            (0.999, "p999_us", "p99.9"),
        ] {
            self.num(
                &format!("{prefix}{k}"),
                &format!("{what} {l}"),
                h.value_at_quantile(q) as f64,
                "µs",
            );
        }
        self.num(
            &format!("{prefix}max_us"),
            &format!("{what} max"),
            h.max() as f64,
            "µs",
        )
    }

    /// The server's peak RSS and CPU seconds (whole scenario).
    pub fn server(&mut self, s: Option<Sample>) -> &mut Self {
        match s {
            Some(s) => {
                self.num(
                    "server_peak_rss_bytes",
                    "server peak RSS (VmHWM)",
                    s.hwm as f64,
                    "bytes",
                );
                self.num("server_cpu_s", "server CPU (user+sys)", s.cpu_s, "s");
            }
            None => {
                self.text(
                    "server_peak_rss_bytes",
                    "server peak RSS",
                    "n/a (external server without --server-pid)",
                );
            }
        }
        self
    }

    /// This process's CPU time (the load generator's own cost).
    pub fn client(&mut self, s: Option<Sample>) -> &mut Self {
        if let Some(s) = s {
            self.num("client_cpu_s", "load generator CPU", s.cpu_s, "s");
        }
        self
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key)
    }

    pub fn json(&self) -> Value {
        Value::Object(self.json.clone())
    }

    pub fn table(&self) -> String {
        let w = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let v = self
            .rows
            .iter()
            .filter(|r| !r.2.is_empty())
            .map(|r| r.1.len())
            .max()
            .unwrap_or(0);
        let mut out = format!("== {}: {}\n", self.scenario, self.title);
        for (l, val, unit) in &self.rows {
            if unit.is_empty() && val.parse::<f64>().is_err() && !val.contains(',') {
                out.push_str(&format!("  {l:<w$}  {val}\n"));
            } else {
                out.push_str(&format!("  {l:<w$}  {val:>v$} {unit}\n"));
            }
        }
        out
    }
}
