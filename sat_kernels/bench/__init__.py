"""Benchmarks of sat_kernels: MLP microbenchmarks (providers side by side) and a training-step benchmark.

Run ``sat-bench --help`` (or ``python -m sat_kernels.bench``). Results are appended to ``benchmarks/results/*.jsonl``
with the device, versions, git revision and date; ``sat-bench plot`` draws them.
"""
