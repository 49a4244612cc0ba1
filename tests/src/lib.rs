//! Shared helpers for integration and conformance tests.
