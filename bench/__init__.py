"""Benchmarks of jlad: a raw ONNX Runtime baseline and a load generator against the service.

`python -m bench.run_all --out runs/bench` runs everything (docs/BENCH.md); the pieces run
alone too: `python -m bench.raw_onnx`, `python -m bench.loadgen`.
"""
