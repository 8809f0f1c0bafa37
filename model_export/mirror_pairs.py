"""Find each landmark's left-right counterpart for the mirror test-time augmentation.

    python -m model_export.mirror_pairs --checkpoint checkpoints/faces \\
        --data ../shared/data/mtfl-train [--images 1000] [--write]

W_D's landmarks are found without labels, so which landmark of a mirrored face stands for
which of the face is a property of the trained weights. This runs the last landmark pass
(`JLAD.last_landmark_input`: the image, or the zoomed crop) on training images and on their
mirrors, pairs landmarks by `landmarks.mirror_pairs` and prints each pair's mean distance
(normalised units of the pass's input). `--write` stores the pairing in the checkpoint's
config.json as `model.landmark_mirror`, which turns the averaging on
(`landmarks.mirror_average`); the training config should then say the same (configs/*.yaml).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from model_export.checkpoint import CONFIG, load_model
from model_export.landmarks import mirror_pairs
from model_export.model import JLAD
from model_export.train import load_training_images

log = logging.getLogger("jlad.mirror_pairs")


@torch.no_grad()
def last_pass_points(
    model: JLAD, images: torch.Tensor, batch: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """W_D's points on the last pass's input of each image and on its mirror, (N, K, 2) each,
    in that input's normalised coordinates (the mirror's as W_D placed them)."""
    direct, mirrored = [], []
    for start in tqdm(range(0, len(images), batch), desc="mirror pairs", unit="batch"):
        seen = model.last_landmark_input(images[start : start + batch])
        direct.append(model.landmarks(model.features(seen))["points"])
        mirrored.append(model.landmarks(model.features(seen.flip(-1)))["points"])
    return torch.cat(direct), torch.cat(mirrored)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the training data set root")
    parser.add_argument("--images", type=int, default=1000, help="training images to use")
    parser.add_argument("--write", action="store_true", help="store the pairs in config.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    model, config = load_model(args.checkpoint)
    limits = {**config, "max_images": args.images, "images_per_class": max(1, args.images // 100)}
    images = load_training_images(limits, args.data).images[: args.images]
    points, mirrored = last_pass_points(model, images)
    pairs, distance = mirror_pairs(points, mirrored)
    for k, (j, d) in enumerate(zip(pairs, distance.tolist(), strict=True)):
        log.info("landmark %d <-> %d: mean distance %.3f", k, j, d)
    print(json.dumps({"landmark_mirror": pairs, "mean_distance": distance.tolist()}))
    if args.write:
        path = args.checkpoint / CONFIG
        stored = json.loads(path.read_text())
        stored["model"]["landmark_mirror"] = pairs
        path.write_text(json.dumps(stored, indent=2, sort_keys=True))
        log.info("wrote landmark_mirror %s to %s", pairs, path)


if __name__ == "__main__":
    main()
