"""Faces correspondence on held-out faces under known warps (the `faces` model's `/correspond`).

No annotated faces correspondence set ships in `../shared/data`, so this measures what needs
no labels: each held-out MTFL face (the validation split the landmark evaluation uses) is cut
into two random views by the faces training warps (`FACES_VIEW_WARP`: rotated crops at zoom
0.45-1x, up to 2.2x between the two views, +-30 degrees, anywhere in the frame, colour
jitter; draws fixed by `warp_seed`), and the exact mapping from one view to the other is known.
It checks that the aligner follows zoom, rotation and shift on faces it never saw; it says
nothing about matching *between* two people (a different face shape, expression, identity).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jlad_client.viz import draw_matches
from torch import Tensor
from tqdm import tqdm

from model_export.data import MTFLFaces
from model_export.evaluation.common import (
    METHODS,
    RGB,
    captioned,
    image_features,
    pair_mappings,
    save_png,
    tensor_to_rgb,
    tile,
)
from model_export.geometry import cell_centres
from model_export.model import JLAD
from model_export.warps import WarpConfig, random_views, view_pair_mapping

log = logging.getLogger("jlad.evaluate")

FACES_VIEW_WARP = WarpConfig(scale=0.8, rotation=0.52, shear=0.1, translation=0.3, inside=True)
"""The views of configs/faces.yaml's training (`warp`), i.e. what faces users send."""


def end_point_errors(predicted: Tensor, truth: Tensor, valid: Tensor) -> Tensor:
    """Distances (normalised units: the image is 2 wide) between predicted and true matches
    (B, 2, h, w) at the valid cells (B, 1, h, w), flattened."""
    return (predicted - truth).norm(dim=1)[valid[:, 0] > 0]


def flow_error_figures(errors: Tensor, cell: float) -> dict[str, float]:
    """Mean and median end-point error, and the share of matches within one grid cell."""
    return {
        "epe_mean": float(errors.mean()),
        "epe_median": float(errors.median()),
        "within_one_cell": float((errors <= cell).float().mean()),
    }


@torch.no_grad()
def evaluate_faces_flow(
    model: JLAD,
    data: Path,
    out: Path,
    *,
    input_size: tuple[int, int],
    device: torch.device,
    val_fraction: float = 0.1,
    seed: int = 0,
    pairs: int = 256,
    warp_seed: int = 0,
    batch_size: int = 16,
    figures: int = 6,
    docs_img: Path | None = None,
) -> dict[str, Any]:
    """End-point error of every method (`model`, `nearest_neighbour`, `identity`) between two
    random views of each of `pairs` validation faces (evenly spaced through the split that
    training used: `val_fraction`, `seed`). Cells count where the source view shows the face
    picture and the true match lies inside the target view. A PNG of the model's matches on
    the first `figures` pairs under `out/faces-flow/` and, with `docs_img`, `faces_flow.png`."""
    faces = MTFLFaces(data, input_size, "val", val_fraction=val_fraction, seed=seed, limit=pairs)
    h, w = model.grid_size
    gen = torch.Generator().manual_seed(warp_seed)
    errors: dict[str, list[Tensor]] = {m: [] for m in METHODS}
    drawn: list[RGB] = []
    for start in tqdm(range(0, len(faces), batch_size), desc="faces flow", unit="batch"):
        images = torch.stack(
            [faces[i]["image"] for i in range(start, min(start + batch_size, len(faces)))]
        )
        views, affines = random_views(images, 3, FACES_VIEW_WARP, gen)
        truth, valid = view_pair_mapping(affines[:, 1], affines[:, 2], (h, w))
        source = image_features(model, views[:, 1].to(device))
        target = image_features(model, views[:, 2].to(device))
        mappings = {m: v.cpu() for m, v in pair_mappings(model, source, target).items()}
        for method, mapping in mappings.items():
            errors[method].append(end_point_errors(mapping, truth, valid))
        for i in range(min(figures - len(drawn), len(images))):
            drawn.append(
                _pair_figure(views[i, 1], views[i, 2], mappings["model"][i], valid[i], input_size)
            )
    cell = 2.0 / w
    methods = {m: flow_error_figures(torch.cat(e), cell) for m, e in errors.items()}
    if drawn:
        grid = tile(drawn, 2)
        save_png(out / "faces-flow" / "matches.png", grid)
        if docs_img is not None:
            save_png(docs_img / "faces_flow.png", grid)
    log.info(
        "faces flow, %d pairs: %s",
        len(faces),
        "  ".join(f"{m} EPE {v['epe_mean']:.3f}" for m, v in methods.items()),
    )
    return {
        "methods": methods,
        "num_pairs": len(faces),
        "grid_size": [h, w],
        "cell": cell,
        "val_fraction": val_fraction,
        "seed": seed,
        "warp_seed": warp_seed,
        "protocol": "two random views of each validation face (faces training warps: crops at "
        "zoom 0.45-1x, +-30 deg); end-point error of view 1 -> view 2 matches in normalised "
        "units (image width 2) over cells showing the picture whose match lies inside view "
        "2; within_one_cell: share with error <= one grid cell (2 / grid width)",
    }


def _pair_figure(
    source: Tensor, target: Tensor, mapping: Tensor, valid: Tensor, size: tuple[int, int]
) -> RGB:
    """Every third valid cell's predicted match, source view left, target view right."""
    height, width = size
    h, w = mapping.shape[-2:]
    keep = np.zeros((h, w), bool)
    keep[1::3, 1::3] = True
    keep &= valid[0].numpy() > 0
    scale = np.array([width / 2, height / 2])
    sources = (cell_centres(h, w).numpy()[keep] + 1) * scale
    targets = (mapping.permute(1, 2, 0).numpy()[keep] + 1) * scale
    picture = draw_matches(tensor_to_rgb(source), tensor_to_rgb(target), sources, targets)
    return captioned(picture, "view 1 -> view 2 (model)")
