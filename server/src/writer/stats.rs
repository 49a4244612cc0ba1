//! The writer's counters: what the load tool and the shutdown log read.
//!
//! Touches only atomics and the process-wide `metrics` counters; the
//! batching loop records one entry per batch.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters the load tool and the shutdown log read.
#[derive(Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub commits: AtomicU64,
    pub requests: AtomicU64,
    pub ops: AtomicU64,
    pub commit_micros: AtomicU64,
    pub max_batch: AtomicU64,
    /// Committed batches by request count: bucket i holds sizes in
    /// `[2^i, 2^(i+1))`.
    pub batch_log2: [AtomicU64; 24],
}

impl WriterStats {
    pub(super) fn record(&self, requests: usize, ops: u64, commit_micros: Option<u64>) {
        crate::metrics::batch(requests, ops, commit_micros);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(requests as u64, Ordering::Relaxed);
        self.ops.fetch_add(ops, Ordering::Relaxed);
        self.max_batch.fetch_max(requests as u64, Ordering::Relaxed);
        if let Some(us) = commit_micros {
            self.commits.fetch_add(1, Ordering::Relaxed);
            self.commit_micros.fetch_add(us, Ordering::Relaxed);
            let bucket = (usize::BITS - 1 - requests.max(1).leading_zeros()) as usize;
            self.batch_log2[bucket.min(23)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One line for logs and the load tool.
    pub fn summary(&self) -> String {
        let commits = self.commits.load(Ordering::Relaxed);
        let requests = self.requests.load(Ordering::Relaxed);
        let ops = self.ops.load(Ordering::Relaxed);
        let us = self.commit_micros.load(Ordering::Relaxed);
        let mut hist = String::new();
        for (i, b) in self.batch_log2.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            if n > 0 {
                hist.push_str(&format!(" [{}..{}):{}", 1u64 << i, 1u64 << (i + 1), n));
            }
        }
        format!(
            "{} batches, {commits} commits, {requests} requests, {ops} changes; \
             mean {:.1} requests/commit, max batch {}, mean commit {:.0} us; \
             commits by batch size:{hist}",
            self.batches.load(Ordering::Relaxed),
            requests as f64 / commits.max(1) as f64,
            self.max_batch.load(Ordering::Relaxed),
            us as f64 / commits.max(1) as f64,
        )
    }
}
