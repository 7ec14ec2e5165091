"""`make bench`: measures the embedded platform against plain `docker run` on this machine.

Run `python -m bench.run` (full, ~25 min) or `python -m bench.run --quick` (smoke, a few minutes).
Results go to bench/results.json, BENCHMARKS.md and bench/plot.png (quick runs: bench/work/quick/).
"""
