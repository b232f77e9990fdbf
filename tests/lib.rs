//! End-to-end tests live under tests/tests; this library holds their shared harness.
