//! A scenario's result: one table for people, one flat JSON object for
//! scripts.

use hdrhistogram::Histogram;
use serde_json::{Map, Value};

use super::proc::Sample;

#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: String,
    pub title: String,
    rows: Vec<Row>,
    json: Map<String, Value>,
}

#[derive(Debug, Clone)]
struct Row {
    key: String,
    label: String,
    /// A number, or text.
    value: Result<f64, String>,
    unit: String,
}

fn show(value: f64) -> String {
    let decimals = if value.abs() >= 100.0 || value == value.trunc() {
        0
    } else if value.abs() >= 1.0 {
        2
    } else {
        4
    };
    group(value, decimals)
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
        self.rows.push(Row {
            key: key.into(),
            label: label.into(),
            value: Ok(value),
            unit: unit.into(),
        });
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
        self.rows.push(Row {
            key: key.into(),
            label: label.into(),
            value: Err(value.into()),
            unit: String::new(),
        });
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

    /// Replaces a number already reported.
    pub fn set_num(&mut self, key: &str, value: f64) {
        if let Some(r) = self.rows.iter_mut().find(|r| r.key == key) {
            r.value = Ok(value);
            if let Some(n) = serde_json::Number::from_f64(value) {
                self.json.insert(key.into(), Value::Number(n));
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key)
    }

    pub fn json(&self) -> Value {
        Value::Object(self.json.clone())
    }

    pub fn table(&self) -> String {
        let w = self.rows.iter().map(|r| r.label.len()).max().unwrap_or(0);
        let shown: Vec<Option<String>> = self
            .rows
            .iter()
            .map(|r| r.value.as_ref().ok().map(|v| show(*v)))
            .collect();
        let v = shown.iter().flatten().map(|s| s.len()).max().unwrap_or(0);
        let mut out = format!("== {}: {}\n", self.scenario, self.title);
        for (r, num) in self.rows.iter().zip(&shown) {
            match (num, &r.value) {
                (Some(n), _) => out.push_str(&format!("  {:<w$}  {n:>v$} {}\n", r.label, r.unit)),
                (None, Err(t)) => out.push_str(&format!("  {:<w$}  {t}\n", r.label)),
                (None, Ok(_)) => {}
            }
        }
        out
    }

    /// One report from several runs of a scenario: the median of every
    /// number (rows as in the first run), the run count in the title and
    /// as `runs`.
    pub fn median_of(runs: &[Report]) -> Option<Report> {
        let first = runs.first()?;
        let mut r = Report::new(
            &first.scenario,
            format!("{} (median of {} runs)", first.title, runs.len()),
        );
        r.num("runs", "runs", runs.len() as f64, "");
        for row in &first.rows {
            match &row.value {
                Ok(_) => {
                    let vals: Vec<f64> = runs
                        .iter()
                        .filter_map(|x| x.rows.iter().find(|y| y.key == row.key))
                        .filter_map(|y| y.value.as_ref().ok().copied())
                        .collect();
                    r.num(&row.key, &row.label, super::median(&vals), &row.unit);
                }
                Err(t) => {
                    r.text(&row.key, &row.label, t);
                }
            }
        }
        Some(r)
    }
}
