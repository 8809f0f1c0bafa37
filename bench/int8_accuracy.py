"""Accuracy of exported graphs, precision against precision: PF-WILLOW PCK@0.1 (mean of the
four classes), TSS mask-transfer IoU and DAVIS-sample J (`--tasks ...,tss,davis`) for
`objects` and the MTFL landmark error for `faces`, computed through ONNX Runtime with the
evaluation code of `model_export.evaluate` (same protocol, same images).

    python -m bench.int8_accuracy --model-dir models --checkpoints checkpoints \\
        --data ../shared/data --precisions fp32,int8 --out runs/bench/int8

The model's own path (features, landmark head, alignment head) runs the exported graphs of
each precision; the nearest-neighbour baseline that `evaluate` reports beside it keeps the
checkpoint's PyTorch backbone (it is not what is compared). Targets (issue 16): int8 PCK@0.1
within 0.01 and faces error within 0.5 points of fp32; TSS and DAVIS have no stated bound
(reported, and held to PF-WILLOW's 0.01 here).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.common import declared_inputs, machine_info, write_json
from model_export.checkpoint import load_model
from model_export.evaluate import evaluate_faces, evaluate_pfwillow, evaluate_tss
from model_export.evaluation.davis import evaluate_davis
from model_export.model import JLAD
from service.runtime import GRAPHS, Session, find_models, session_options

log = logging.getLogger("bench.int8_accuracy")

PCK_TOLERANCE = 0.01
FACES_TOLERANCE = 0.5
MASK_TOLERANCE = 0.01


class OnnxModel:
    """Stands in for `JLAD` in `model_export.evaluate`: `adapt`, `landmarks` and `align` run
    the exported graphs of one precision (the `backbone` graph holds backbone and adapter, so
    `adapt` runs it on the images `backbone_features` last saw); `backbone_features` itself
    stays the checkpoint's PyTorch backbone, for the nearest-neighbour baseline."""

    def __init__(self, model: JLAD, graphs: dict[str, Path], threads: int = 0) -> None:
        self.config = model.config
        self._torch = model
        options = session_options(threads, spinning=True)
        self._sessions = {
            g: Session(p, options, ["CPUExecutionProvider"]) for g, p in graphs.items()
        }
        self._dtype = (
            np.float16
            if self._sessions["backbone"].get_inputs()[0].type == "tensor(float16)"
            else np.float32
        )
        self._images: dict[int, Tensor] = {}

    def _run(self, graph: str, feed: dict[str, Tensor]) -> list[Tensor]:
        arrays = {k: v.detach().cpu().numpy().astype(self._dtype) for k, v in feed.items()}
        outs = self._sessions[graph].run(None, arrays)
        return [torch.from_numpy(np.asarray(o, np.float32)) for o in outs]

    def backbone_features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            features = self._torch.backbone_features(images)
        self._images = {id(features): images}
        return features

    def features(self, images: Tensor) -> Tensor:
        """The backbone graph (backbone and adapter) on `images`."""
        return self._run("backbone", {"image": images})[0]

    def adapt(self, backbone_features: Tensor) -> Tensor:
        images = self._images.pop(id(backbone_features))
        return self._run("backbone", {"image": images})[0]

    def detect_landmarks(self, image: Tensor, features: Tensor) -> dict[str, Tensor]:
        feed = {"features": features, "image": image}
        heatmaps, points, confidence = self._run(
            "landmarks", declared_inputs(self._sessions["landmarks"], feed)
        )
        return {"heatmaps": heatmaps, "points": points, "confidence": confidence}

    def align(self, source: Tensor, target: Tensor) -> dict[str, Tensor]:
        mapping, log_sigma, confidence = self._run(
            "align", {"source_features": source, "target_features": target}
        )
        return {"mapping": mapping, "log_sigma": log_sigma, "confidence": confidence}


def graphs_of(model_dir: Path, name: str, precision: str) -> dict[str, Path]:
    info = find_models(model_dir, [name])[name]
    return {g: info.graph_path(precision, g)[0] for g in GRAPHS}


def per_precision(
    args: argparse.Namespace,
    precisions: list[str],
    model_name: str,
    evaluate: Callable[..., dict[str, Any]],
    data_name: str,
    figures_of: Callable[[dict[str, Any]], dict[str, Any]],
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """`evaluate` (a `model_export.evaluate` benchmark) on `args.data / data_name` through
    the exported graphs of `model_name` in each precision; `figures_of` picks what is kept
    of each report."""
    model, config = load_model(args.checkpoints / model_name)
    size = (int(config["input_size"][0]), int(config["input_size"][1]))
    out: dict[str, dict[str, Any]] = {}
    for precision in precisions:
        report = evaluate(
            OnnxModel(model, graphs_of(args.model_dir, model_name, precision)),
            args.data / data_name,
            args.out / "figures" / precision,
            input_size=size,
            device=torch.device("cpu"),
            figures=0,
            **options,
        )
        out[precision] = figures_of(report)
        log.info("%s %s: %s", data_name, precision, out[precision])
    return out


def _pfwillow_figures(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "pck@0.1": report["methods"]["model"]["pck@0.1"],
        "per_class": {c: v["model"]["pck@0.1"] for c, v in report["per_class"].items()},
        "pairs": report["num_pairs"],
    }


def _tss_figures(report: dict[str, Any]) -> dict[str, Any]:
    return {
        **report["methods"]["model"],
        "confidence_roc_auc": report["confidence"]["roc_auc"],
        "pairs": report["num_pairs"],
    }


def _davis_figures(report: dict[str, Any]) -> dict[str, Any]:
    return {
        **{f"{mode}_J": v["J"] for mode, v in report["methods"].items()},
        "sequences": report["num_sequences"],
    }


def _faces_figures(report: dict[str, Any]) -> dict[str, Any]:
    model_figures = report["methods"]["model"]
    return {
        "landmark_error_percent": model_figures["landmark_error_percent"],
        # the tight-crop set, where model_export.evaluate reports one
        "tight_landmark_error_percent": model_figures.get("tight_landmark_error_percent"),
        "train": report["num_train"],
        "val": report["num_val"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument(
        "--tasks", default="pfwillow,faces", help="comma list of pfwillow, tss, davis, faces"
    )
    parser.add_argument("--faces-train", type=int, default=2000, help="MTFL train faces used")
    parser.add_argument("--faces-val", type=int, default=600, help="MTFL val faces used")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/int8"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, args.threads or 2))
    precisions = args.precisions.split(",")
    tasks = args.tasks.split(",")
    results: dict[str, dict[str, Any]] = {}
    if "pfwillow" in tasks:
        results["pfwillow"] = per_precision(
            args, precisions, "objects", evaluate_pfwillow, "pf-willow-sample", _pfwillow_figures
        )
    if "tss" in tasks:
        results["tss"] = per_precision(
            args, precisions, "objects", evaluate_tss, "tss-sample", _tss_figures
        )
    if "davis" in tasks:
        results["davis"] = per_precision(
            args, precisions, "objects", evaluate_davis, "davis2016-sample", _davis_figures
        )
    if "faces" in tasks:
        results["faces"] = per_precision(
            args,
            precisions,
            "faces",
            evaluate_faces,
            "mtfl-train",
            _faces_figures,
            max_train=args.faces_train,
            max_val=args.faces_val,
        )
    lines = ["| task | " + " | ".join(precisions) + " | delta (last - first) | target |"]
    lines.append("|---|" + "---:|" * len(precisions) + "---:|---|")
    checks = {
        "pfwillow": ("pck@0.1", PCK_TOLERANCE, "PF-WILLOW PCK@0.1 (4-class mean)"),
        "faces": ("landmark_error_percent", FACES_TOLERANCE, "MTFL landmark error, % IOD"),
        "tss": ("mask_iou", MASK_TOLERANCE, "TSS mask-transfer IoU"),
        "davis": ("anchor_J", MASK_TOLERANCE, "DAVIS sample anchor J (mask propagation)"),
    }
    for task, (key, tolerance, label) in checks.items():
        if task not in results:
            continue
        values = [results[task][p][key] for p in precisions]
        delta = values[-1] - values[0]
        # within the tolerance of the first precision, or better (higher PCK, lower error)
        worse_by = delta if task == "faces" else -delta
        verdict = "pass" if worse_by <= tolerance else "miss"
        results[task]["delta"] = delta
        results[task]["target"] = f"worse by <= {tolerance}: {verdict}"
        lines.append(
            f"| {label} | "
            + " | ".join(f"{v:.4f}" for v in values)
            + f" | {delta:+.4f} | {results[task]['target']} |"
        )
    table = "\n".join(lines)
    write_json(args.out / "accuracy.json", {"machine": machine_info(), "results": results})
    (args.out / "accuracy.md").write_text(table + "\n")
    print(table)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
