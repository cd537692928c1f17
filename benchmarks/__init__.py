"""dpkernels benchmarks: dense vs gated, layer by layer and whole model (python -m benchmarks)."""
