//! Benchmarks live in benches/benches; helpers here.
