//! Test-host harness for end-to-end tests.
