"""dpkernels benchmarks: dense vs gated, layer by layer (run as python -m benchmarks.bench_NAME)."""
