"""Load tests, benchmarks and their reports."""
