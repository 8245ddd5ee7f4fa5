"""safespec benchmarks: `make bench` (python -m bench) measures speed and quality on this machine and
writes bench/RESULTS.md. Numbers are ratios or quality measured in one run, never asserted in tests."""
