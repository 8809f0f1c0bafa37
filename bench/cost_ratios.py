"""What each part of a served model costs, as ratios to the bare backbone trunk, in one run.

The raw ONNX Runtime loop (no HTTP, no batcher) times, alternating in rounds so that drifting
background load hits every line alike, at one batch size (default 4):

- `trunk`: the bare EfficientNet-Lite trunk of the model's backbone (stem and every block,
  no hypercolumn, no adapter, no 1x1 head) at the model's input size, exported here from
  `model_export.backbones`; for reference also the bare Lite0 trunk when the model's is
  another one;
- `backbone`: the served backbone graph (trunk up to the last tap + hypercolumn + adapter);
- `landmarks`: the landmark graph on B images' features (W_D; with `landmark_zoom` also
  the second pass: backbone and W_D on each image's crop; with `landmark_mirror` also the
  last pass on the mirrored input);
- `align`: the W_A/W_C graph on B (source, target) pairs.

and derives the issue-14 targets: backbone / trunk <= 2; align (B pairs) / backbone
(B images) <= 2; one `/correspond` pair (2 backbone images + 1 align pair) <= 6x the trunk's
per-image cost; one `/landmarks` image (backbone + W_D) <= 3x the trunk's per-image cost.

    python -m bench.cost_ratios --model-dir models --model objects --batch 4 --rounds 5 \
        --out runs/bench/cost
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from bench.common import declared_inputs, machine_info, write_json
from service.runtime import Session, find_models, session_options

log = logging.getLogger("bench.cost_ratios")

TARGETS = {
    "backbone_over_trunk": 2.0,
    "align_over_backbone": 2.0,
    "correspond_pair_over_trunk_image": 6.0,
    "landmarks_image_over_trunk_image": 3.0,
}


def export_bare_trunk(variant: str, input_size: tuple[int, int], path: Path) -> None:
    """The whole EfficientNet-Lite trunk `variant` (ImageNet weights, eval mode) as an ONNX
    graph image (B, 3, H, W) -> last block's output, dynamic batch."""
    import torch

    from model_export.backbones import EfficientNetLite
    from model_export.onnx_passes import fold_pads_in_file

    trunk = EfficientNetLite(variant, taps=None)
    trunk.load_imagenet()
    trunk.eval()
    dummy = torch.rand(2, 3, *input_size)
    torch.onnx.export(
        trunk,
        (dummy,),
        str(path),
        input_names=["image"],
        output_names=["features"],
        dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    # The same graph rewrite as the served graphs get (model_export/export.py), so that the
    # trunk stays the bare baseline of the same exporter.
    fold_pads_in_file(path)


def _session(path: Path, threads: int) -> Session:
    return Session(path, session_options(threads, spinning=True), ["CPUExecutionProvider"])


def time_call(run: Callable[[], object], seconds: float, min_iterations: int = 3) -> float:
    """Median seconds of `run()` over at least `min_iterations` calls and `seconds` seconds
    (after one warm-up call)."""
    run()
    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < min_iterations or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        run()
        durations.append(time.perf_counter() - t0)
    return statistics.median(durations)


def measure(
    model_dir: Path,
    model: str,
    precision: str,
    batch: int,
    rounds: int,
    seconds: float,
    threads: int,
) -> dict[str, Any]:
    """Median per-call seconds of every line over `rounds` alternating rounds, and the
    ratios the targets are stated in."""
    info = find_models(model_dir, [model])[model]
    manifest = json.loads((info.root / "manifest.json").read_text())
    variant = str(manifest["features"]["backbone"])
    h, w = info.input_size
    graphs = {
        g: _session(info.graph_path(precision, g)[0], threads)
        for g in ("backbone", "landmarks", "align")
    }
    rng = np.random.default_rng(0)
    images: NDArray[np.float32] = rng.random((2 * batch, 3, h, w), dtype=np.float32)
    features = graphs["backbone"].run(None, {"image": images})[0]
    landmark_feed = declared_inputs(
        graphs["landmarks"], {"features": features[:batch], "image": images[:batch]}
    )
    lines: dict[str, Callable[[], object]] = {
        "backbone": lambda: graphs["backbone"].run(None, {"image": images[:batch]}),
        "landmarks": lambda: graphs["landmarks"].run(None, landmark_feed),
        "align": lambda: graphs["align"].run(
            None, {"source_features": features[:batch], "target_features": features[batch:]}
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        trunks = [variant] + ([] if variant == "efficientnet_lite0" else ["efficientnet_lite0"])
        for name in trunks:
            path = Path(tmp) / f"{name}.onnx"
            export_bare_trunk(name, (h, w), path)
            session = _session(path, threads)
            key = "trunk" if name == variant else f"trunk ({name})"
            lines[key] = lambda s=session: s.run(None, {"image": images[:batch]})  # type: ignore[misc]
        samples: dict[str, list[float]] = {k: [] for k in lines}
        for _ in tqdm(range(rounds), desc="cost rounds", unit="round"):
            for key, run in lines.items():
                samples[key].append(time_call(run, seconds))
    ms = {k: 1000 * statistics.median(v) for k, v in samples.items()}
    per_image_trunk = ms["trunk"] / batch
    ratios = {
        "backbone_over_trunk": ms["backbone"] / ms["trunk"],
        "align_over_backbone": ms["align"] / ms["backbone"],
        "correspond_pair_over_trunk_image": (2 * ms["backbone"] + ms["align"])
        / batch
        / per_image_trunk,
        "landmarks_image_over_trunk_image": (ms["backbone"] + ms["landmarks"])
        / batch
        / per_image_trunk,
    }
    return {
        "model": f"{info.name}/{info.version}",
        "precision": precision,
        "backbone": variant,
        "input_size": [h, w],
        "batch": batch,
        "rounds": rounds,
        "intra_op_threads": threads,
        "ms_per_call": {k: round(v, 2) for k, v in ms.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "met": {k: ratios[k] <= t for k, t in TARGETS.items()},
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="objects")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per line per round")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cost"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = measure(
        args.model_dir,
        args.model,
        args.precision,
        args.batch,
        args.rounds,
        args.seconds,
        args.threads,
    )
    write_json(args.out / f"cost_{args.model}_{args.precision}.json", report)
    for key, value in report["ms_per_call"].items():
        log.info("%-28s %8.2f ms per call of batch %d", key, value, args.batch)
    for key, value in report["ratios"].items():
        log.info("%-34s %6.2f (target <= %.1f)", key, value, TARGETS[key])
    return report


if __name__ == "__main__":
    main()
