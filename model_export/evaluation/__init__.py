"""Benchmarks of `python -m model_export.evaluate`, one module per benchmark.

`common` holds what they share (running the model and the baselines, figure tiling);
each benchmark module exposes one `evaluate_<task>(model, data, out, *, input_size, device,
...)` that returns the task's report (a dict with at least `methods`), which
`model_export.evaluate.run_task` writes to `<out>/<task>.json`.
"""
