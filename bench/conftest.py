"""Benchmarks: `pytest --benchmark-only` from the repository root. In the test command
(`--benchmark-disable`) each body runs once as a smoke test, so the suite cannot rot."""
