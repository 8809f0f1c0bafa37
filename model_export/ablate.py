"""Ablation table: which parts of the method earn its figures.

Trains the variants of one config on the same data and schedule (the config's stages with
their iteration counts scaled by `--scale`), evaluates each like `model_export.evaluate`
and writes `ablation.json` and the markdown table `ablation.md` under `--out`:

- untrained: no training at all (the frozen backbone, identity adapter, neighbourhood
  consensus and soft-argmax);
- alignment alone: W_D never learns (`ablation.train_landmarks: false`);
- landmarks alone: W_A, W_C never learn (`ablation.train_alignment: false`);
- joint: the method;
- joint / alignment alone without the sigma weighting (`ablation.sigma_weighting: false`).

The backbone features of the training images are computed once and shared by every
variant. Example (the README's table):

    python -m model_export.ablate --config configs/objects.yaml --data ../shared/data \
        --tasks pfwillow tss --scale 0.3 --out runs/ablation/objects
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from model_export.evaluate import DEFAULT_DATA_DIRS, run_task
from model_export.model import JLAD, ModelConfig
from model_export.train import cache_backbone_features, load_training_images, run_training

log = logging.getLogger("jlad.ablate")

VARIANTS: dict[str, dict[str, bool] | None] = {
    "untrained": None,
    "alignment alone": {"train_landmarks": False},
    "landmarks alone": {"train_alignment": False},
    "joint (the method)": {},
    "alignment alone, no sigma": {"train_landmarks": False, "sigma_weighting": False},
    "joint, no sigma": {"sigma_weighting": False},
}

# The figure of each task that goes into the table.
HEADLINE = {
    "pfwillow": ("pck@0.1", "PF-WILLOW PCK@0.1"),
    "tss": ("flow_accuracy", "TSS flow acc."),
    "faces": ("landmark_error_percent", "MTFL landmark error (% IOD, lower is better)"),
}
TRAINING_DATA_DIRS = {"class_folders": "caltech101", "mtfl": "mtfl-train"}


def variant_config(base: dict[str, Any], ablation: dict[str, bool] | None, scale: float) -> dict:
    """`base` with its ablation switches set and every stage's iterations scaled
    (`ablation=None`: no training, every stage at 0 iterations)."""
    config = copy.deepcopy(base)
    for stage in config["stages"]:
        its = 0 if ablation is None else max(1, round(int(stage["iterations"]) * scale))
        stage["iterations"] = its
    config["ablation"] = dict(ablation or {})
    return config


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def headline(report: dict[str, Any], task: str, method: str) -> float:
    key, _ = HEADLINE[task]
    return float(report["methods"][method][key])


def markdown_table(rows: dict[str, dict[str, float]], tasks: Sequence[str]) -> str:
    head = "| variant | " + " | ".join(HEADLINE[t][1] for t in tasks) + " |"
    rule = "|---|" + "---:|" * len(tasks)
    lines = [head, rule]
    for name, figures in rows.items():
        cells = (f"{figures[t]:.3f}" if t in figures else "-" for t in tasks)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="base training config")
    parser.add_argument("--data", type=Path, required=True, help="folder holding the data sets")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", choices=sorted(HEADLINE), default=["pfwillow"])
    parser.add_argument("--scale", type=float, default=0.3, help="share of each stage's its")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-val", type=int, default=None, help="faces: cap the val split")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    base = yaml.safe_load(args.config.read_text())
    train_root = args.data / TRAINING_DATA_DIRS.get(base.get("dataset", ""), "")
    base["data"] = str(train_root)
    data = load_training_images(base, train_root)
    torch.manual_seed(int(base.get("seed", 0)))
    cached = cache_backbone_features(JLAD(ModelConfig.from_dict(base["model"])), data.images)

    rows: dict[str, dict[str, float]] = {}
    baselines: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for name in tqdm(args.variants, desc="ablation variants", unit="variant"):
        config = variant_config(base, VARIANTS[name], args.scale)
        checkpoint = args.out / slug(name)
        log.info("variant %r: ablation %s", name, config["ablation"])
        run_training(config, data, checkpoint, cached=cached)
        rows[name] = {}
        for task in args.tasks:
            options: dict[str, Any] = {"figures": 0}
            if task == "faces":
                options["max_val"] = args.max_val
            report = run_task(
                task,
                checkpoint,
                args.data / DEFAULT_DATA_DIRS[task],
                checkpoint / "eval",
                device=torch.device("cpu"),
                options=options,
            )
            rows[name][task] = headline(report, task, "model")
            for method in report["methods"]:
                if method != "model":  # each task's own baselines (faces: mean shape)
                    baselines.setdefault(method, {})[task] = headline(report, task, method)
    for method, figures in baselines.items():
        rows[f"baseline: {method.replace('_', ' ')}"] = figures
    result = {
        "config": str(args.config),
        "scale": args.scale,
        "stages": variant_config(base, {}, args.scale)["stages"],
        "tasks": args.tasks,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(result, indent=2))
    (args.out / "ablation.md").write_text(markdown_table(rows, args.tasks))
    log.info("ablation table:\n%s", markdown_table(rows, args.tasks))
    return result


if __name__ == "__main__":
    main()
