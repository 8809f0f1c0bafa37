"""Evaluation CLI: PCK on PF-WILLOW, flow accuracy and mask IoU on TSS, landmark error on MTFL.

Tasks: `pfwillow`, `tss`, `faces` (as cropped and tight crops), `faces-flow` (the faces
model's matches between two known views of held-out faces), `objects-landmarks` (spread, part
purity and regressor error of the objects model's landmarks on PF-WILLOW), `davis` once its
module exists, and `all`.

    python -m model_export.evaluate pfwillow --checkpoint checkpoints/objects \\
        --data ../shared/data/pf-willow-sample --out runs/eval/objects
    python -m model_export.evaluate tss --checkpoint checkpoints/objects \\
        --data ../shared/data/tss-sample --out runs/eval/objects
    python -m model_export.evaluate faces --checkpoint checkpoints/faces \\
        --data ../shared/data/mtfl-train --out runs/eval/faces
    python -m model_export.evaluate objects-landmarks --checkpoint checkpoints/objects \\
        --data ../shared/data/pf-willow-sample --out runs/eval/objects
    python -m model_export.evaluate all --checkpoints checkpoints --data ../shared/data \\
        --out runs/eval --docs-img docs/img

Every task reports the model beside two baselines computed on the same images:
`nearest_neighbour` (argmax of cosine similarity between the model's own frozen backbone
features, no trained head) and `identity` (every position matched to the same normalised
position); the landmark tasks report the mean-shape baseline. Each run writes
`<out>/<task>.json` (figures) and PNGs under `<out>/<task>/`.
Protocols: docs/EVALUATION.md. One module per benchmark under `model_export/evaluation/`;
this module is the command line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from model_export.checkpoint import load_config, load_model
from model_export.data import MTFL_MISALIGNED
from model_export.evaluation.common import METHODS
from model_export.evaluation.faces import FACES_MAX_TRAIN, evaluate_faces
from model_export.evaluation.faces_flow import evaluate_faces_flow
from model_export.evaluation.object_landmarks import evaluate_objects_landmarks
from model_export.evaluation.pfwillow import evaluate_pfwillow
from model_export.evaluation.tss import evaluate_tss

log = logging.getLogger("jlad.evaluate")

# The benchmark functions stay importable from here (bench/int8_accuracy.py uses them).
__all__ = [
    "DEFAULT_DATA_DIRS",
    "DEFAULT_MODELS",
    "METHODS",
    "RUNNERS",
    "TASKS",
    "evaluate_faces",
    "evaluate_faces_flow",
    "evaluate_objects_landmarks",
    "evaluate_pfwillow",
    "evaluate_tss",
    "main",
    "run_task",
]

Runner = Callable[..., dict[str, Any]]
RUNNERS: dict[str, Runner] = {
    "pfwillow": evaluate_pfwillow,
    "tss": evaluate_tss,
    "faces": evaluate_faces,
    "faces-flow": evaluate_faces_flow,
    "objects-landmarks": evaluate_objects_landmarks,
}
DEFAULT_DATA_DIRS = {
    "pfwillow": "pf-willow-sample",
    "tss": "tss-sample",
    "faces": "mtfl-train",
    "faces-flow": "mtfl-train",
    "objects-landmarks": "pf-willow-sample",
}
DEFAULT_MODELS = {
    "pfwillow": "objects",
    "tss": "objects",
    "faces": "faces",
    "faces-flow": "faces",
    "objects-landmarks": "objects",
}
LANDMARK_TASKS = ("faces", "objects-landmarks")

# Benchmarks written in parallel register themselves only once their module exists.
OPTIONAL = {"davis": ("evaluate_davis", "davis2016-sample", "objects")}
for _task, (_function, _folder, _model) in OPTIONAL.items():
    if importlib.util.find_spec(f"model_export.evaluation.{_task}") is not None:
        _module = importlib.import_module(f"model_export.evaluation.{_task}")
        RUNNERS[_task] = getattr(_module, _function)
        DEFAULT_DATA_DIRS[_task] = _folder
        DEFAULT_MODELS[_task] = _model

TASKS = tuple(RUNNERS)


# --- command line --------------------------------------------------------------------------


def run_task(
    task: str,
    checkpoint: Path,
    data: Path,
    out: Path,
    *,
    device: torch.device,
    options: dict[str, Any] | None = None,
    update_checkpoint_metrics: bool = False,
) -> dict[str, Any]:
    """Evaluate one checkpoint on one task; writes `<out>/<task>.json` and returns it."""
    model, config = load_model(checkpoint)
    model.to(device)
    input_size = (int(config["input_size"][0]), int(config["input_size"][1]))
    log.info("%s: checkpoint %s, data %s, input %dx%d", task, checkpoint, data, *input_size)
    start = time.perf_counter()
    result = RUNNERS[task](
        model, data, out, input_size=input_size, device=device, **(options or {})
    )
    report = {
        "task": task,
        "checkpoint": str(checkpoint),
        "data": str(data),
        "input_size": list(input_size),
        "seconds": round(time.perf_counter() - start, 2),
        **result,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task}.json").write_text(json.dumps(report, indent=2))
    for method, figures in report["methods"].items():
        log.info("%s %-18s %s", task, method, "  ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    if update_checkpoint_metrics:
        path = checkpoint / "metrics.json"
        existing = json.loads(path.read_text()) if path.exists() else {}
        existing[task] = {"data": data.name, "methods": report["methods"]}
        path.write_text(json.dumps(existing, indent=2, sort_keys=True))
    return report


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_export.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("task", choices=[*TASKS, "all"])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="one checkpoint folder, e.g. a training run's --out (single task; default "
        "<checkpoints>/<model>)",
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=Path("checkpoints"),
        help="folder of checkpoints (task 'all': objects/ and faces/ in it)",
    )
    parser.add_argument("--objects-model", default="objects")
    parser.add_argument("--faces-model", default="faces")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the folder holding the data sets (pf-willow-sample/, tss-sample/, mtfl-train/ "
        "...); for a single task also the data set's own folder",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ...")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--figures",
        type=int,
        default=None,
        help="how many pairs (or faces) to draw (default per task)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="faces: held-out share (default: the checkpoint's training config, else 0.1)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="faces: split seed (default: the checkpoint's training config, else 0)",
    )
    parser.add_argument(
        "--crop-seed", type=int, default=0, help="faces: seed of the tight crops' shifts"
    )
    parser.add_argument(
        "--max-train",
        type=int,
        default=FACES_MAX_TRAIN,
        help="faces: training faces the regressor is fitted on, evenly spaced through the "
        "split (default %(default)s: plenty for its 2K x 10 weights; 0 = all)",
    )
    parser.add_argument("--max-val", type=int, default=None, help="faces: cap the val split")
    parser.add_argument("--batch-size", type=int, default=64, help="faces: batch size")
    parser.add_argument(
        "--faces-exclude",
        nargs="*",
        default=list(MTFL_MISALIGNED),
        metavar="GLOB",
        help="faces: image paths to leave out (default: the MTFL crops whose annotations miss "
        "their faces, %(default)s); give the flag alone to keep every face",
    )
    parser.add_argument(
        "--sharpness-sweep",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[],
        metavar="A,B,...",
        help="objects-landmarks: also sweep the heatmap sharpness over these values, with "
        "each class's leave-one-class-out choice (e.g. 1,1.5,2,2.5,3,4,5,7,10)",
    )
    parser.add_argument(
        "--docs-img",
        type=Path,
        default=None,
        help="also write the landmark tasks' PNG grids and the DAVIS strips here "
        "(`make evaluate`: docs/img)",
    )
    parser.add_argument(
        "--update-checkpoint-metrics",
        action="store_true",
        help="also merge the figures into <checkpoint>/metrics.json",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = {"objects": args.objects_model, "faces": args.faces_model}
    models = {task: names[DEFAULT_MODELS[task]] for task in TASKS}
    tasks = list(TASKS) if args.task == "all" else [args.task]
    reports: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for task in tasks:
        if args.task == "all":
            checkpoint = args.checkpoints / models[task]
            data = args.data / DEFAULT_DATA_DIRS[task]
            out = args.out / models[task]
            if not data.is_dir():
                # Loud, not fatal: one missing data set should not cost the other figures.
                log.warning("%s skipped: no data set at %s", task, data)
                skipped[task] = f"no data set at {data}"
                continue
        else:
            checkpoint = args.checkpoint or args.checkpoints / models[task]
            # --data may name the data set itself or the folder holding all of them.
            nested = args.data / DEFAULT_DATA_DIRS[task]
            data, out = (nested if nested.is_dir() else args.data), args.out
        options: dict[str, Any] = {}
        if args.figures is not None:
            options["figures"] = args.figures
        if task in (*LANDMARK_TASKS, "faces-flow", "davis"):
            options["docs_img"] = args.docs_img
        if task == "objects-landmarks" and args.sharpness_sweep:
            options["sharpness_sweep"] = args.sharpness_sweep
        if task in ("faces", "faces-flow"):
            # The split training used: its config's seed and held-out share.
            trained = load_config(checkpoint)
            options.update(
                val_fraction=_first(args.val_fraction, trained.get("val_fraction"), 0.1),
                seed=int(_first(args.seed, trained.get("seed"), 0)),
            )
        if task == "faces":
            options.update(
                crop_seed=args.crop_seed,
                max_train=args.max_train or None,
                max_val=args.max_val,
                batch_size=args.batch_size,
                exclude=args.faces_exclude,
            )
        reports[task] = run_task(
            task,
            checkpoint,
            data,
            out,
            device=device,
            options=options,
            update_checkpoint_metrics=args.update_checkpoint_metrics,
        )
    if args.task == "all":
        summary: dict[str, Any] = {
            task: {"checkpoint": r["checkpoint"], "methods": r["methods"]}
            for task, r in reports.items()
        }
        summary["skipped"] = skipped
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return reports


if __name__ == "__main__":
    main()
