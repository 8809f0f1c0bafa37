"""Training iterations per second of a config's step kinds, on this machine.

Times `--steps` optimiser steps of each kind a config's stages use (synthetic align,
synthetic landmarks, joint on real pairs) on random images, with the config's model, batch
size and `synthetic_space` (the one-off feature caching is left out: it is paid once per
run), so two configs can be compared in one command:

    git show 5d0ccb6:configs/objects.yaml > /tmp/objects_before.yaml
    python -m bench.train_speed --config /tmp/objects_before.yaml configs/objects.yaml \
        --threads 2 --out runs/bench/train_speed
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from bench.common import machine_info, write_json
from model_export import train as T
from model_export.model import JLAD, ModelConfig
from model_export.warps import WarpConfig

log = logging.getLogger("bench.train_speed")


def step_speeds(config: dict[str, Any], steps: int, images: int = 24) -> dict[str, float]:
    """Iterations per second of each step kind of `config` (synthetic align, synthetic
    landmarks, joint align side, joint landmark side)."""
    torch.manual_seed(0)
    model = JLAD(ModelConfig.from_dict(config["model"]))
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size = tuple(config["model"]["input_size"])
    data = torch.rand(images, 3, *size)
    warp = WarpConfig(**config.get("warp", {}))
    gen = torch.Generator().manual_seed(0)
    batch = int(config.get("batch_size", 8))
    space = config.get("synthetic_space", "features")
    terms = T.LandmarkTerms(**config.get("landmark_loss", {}))
    synthetic_features = bool(config.get("synthetic_updates_features", True))
    if space == "views":
        bank = T.cache_view_features(model, data, int(config.get("views_per_image", 3)), warp, gen)
        cached = bank.features[:, 0]
    else:
        bank = None
        cached = T.cache_backbone_features(model, data)

    def pair() -> T.SyntheticPair:
        idx = torch.randint(images, (batch,), generator=gen)
        if bank is not None:
            return bank.pair(idx, gen)
        return T.synthetic_feature_pair(
            model, idx, cached, data if space == "images" else None, warp, gen
        )

    kinds = {
        "synthetic align": lambda: T.align_step_synthetic(
            model, pair(), T.METHOD, synthetic_features
        ),
        "synthetic landmarks": lambda: T.landmark_step_synthetic(model, pair(), terms),
        "joint, align side": lambda: T.joint_step(
            model, cached[:batch], cached[batch : 2 * batch], "align", terms
        ),
        "joint, landmark side": lambda: T.joint_step(
            model, cached[:batch], cached[batch : 2 * batch], "landmarks", terms
        ),
    }
    speeds = {}
    for name, step in kinds.items():
        times = []
        for i in tqdm(range(steps + 1), desc=name, unit="it", leave=False):
            t0 = time.perf_counter()
            metrics = step()
            optimizer.zero_grad(set_to_none=True)
            metrics["total"].backward()
            optimizer.step()
            if i:  # the first step allocates
                times.append(time.perf_counter() - t0)
        speeds[name] = len(times) / sum(times)
    return speeds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train_speed"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"threads": args.threads, "machine": machine_info(), "configs": {}}
    for path in args.config:
        config = yaml.safe_load(path.read_text())
        speeds = step_speeds(config, args.steps)
        report["configs"][str(path)] = {k: round(v, 3) for k, v in speeds.items()}
        for name, value in speeds.items():
            log.info("%s  %-22s %.2f it/s", path, name, value)
    write_json(args.out / "train_speed.json", report)
    return report


if __name__ == "__main__":
    main()
