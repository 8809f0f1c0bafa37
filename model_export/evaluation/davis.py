"""DAVIS-2016: frame 0's mask carried to frames 1..N-1, J = mean IoU with the annotations.

Three ways to give every later frame a mask, scored against the annotations:

`anchor`: straight from frame 0 (what `POST /propagate` and `jlad propagate --mode anchor`
    do): `propagate_mask` through the backward correspondence frame i -> frame 0, with the
    service's unreliable-pixel rule; per-frame reliability = `reliable_fraction`, the share
    of the frame's pixels whose match reaches `min_confidence` (what `/propagate` reports).
`chain`: frame to frame, `jlad_client.sequence.chain_step` on the correspondences
    frame i -> frame i-1 and frame i -> frame 0 (what `jlad propagate --mode chain` does);
    per-frame reliability = the step's reliability (agreement with the directly warped mask).
`identity`: frame 0's mask copied (no motion at all).
`anchor_colour`, `chain_colour`: the same two with every mask's boundaries moved onto the
    frame's colours (`jlad_client.masks.refine_by_colour`, one correspondence cell around
    them; what `--refine colour` / `refine=colour` do).

The model runs here in torch (features once per frame, then the align head once per pair);
everything after the model's outputs (normalised mapping -> pixels, the masks, the
reliabilities) is the client's code, the same that serves users. The report holds J per
sequence and overall (mean over sequences), per-frame J and reliability, and the Pearson
correlation between per-frame reliability and per-frame J (over every frame of every
sequence, and per sequence). PNG strips: `out/davis/davis_<sequence>.png` (and
`docs_img/davis_<sequence>.png`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jlad_client.coords import mapping_to_target_pixels
from jlad_client.images import read_mask
from jlad_client.masks import (
    DEFAULT_MIN_CONFIDENCE,
    mask_iou,
    overlay_labels,
    propagate_mask,
    reliable_fraction,
)
from jlad_client.sequence import DEFAULT_FALLBACK_RELIABILITY, chain_step, colour_refiner
from jlad_client.warp import resize_field
from numpy.typing import NDArray
from PIL import Image
from tqdm import tqdm

from model_export.data import image_to_tensor, read_rgb
from model_export.evaluation.common import RGB, captioned, mean, save_png, tile
from model_export.model import JLAD

log = logging.getLogger("jlad.evaluate")

MODES = ("anchor", "chain", "anchor_colour", "chain_colour", "identity")
PROPAGATING = ("anchor", "chain", "anchor_colour", "chain_colour")  # modes with a reliability
Labels = NDArray[np.integer]
F32 = NDArray[np.float32]


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long series; NaN when either is constant (a
    reliability stuck at one value says nothing about J)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def davis_root(data: Path) -> Path:
    """The DAVIS folder (holding `JPEGImages/480p/`): `data` itself or
    `data/davis2016-sample`."""
    for root in (data, data / "davis2016-sample"):
        if (root / "JPEGImages" / "480p").is_dir():
            return root
    raise FileNotFoundError(f"no JPEGImages/480p under {data} (nor davis2016-sample/ in it)")


def load_sequence(root: Path, name: str) -> tuple[list[RGB], list[Labels]]:
    """Frames (H, W, 3) and annotation label maps (H, W) of one sequence, in frame order."""
    paths = sorted((root / "JPEGImages" / "480p" / name).glob("*.jpg"))
    annotations = root / "Annotations" / "480p" / name
    frames = [read_rgb(p) for p in paths]
    masks = [read_mask(annotations / f"{p.stem}.png") for p in paths]
    return frames, masks


@torch.no_grad()
def backward_alignments(
    model: JLAD,
    frames: Sequence[RGB],
    *,
    input_size: tuple[int, int],
    device: torch.device,
    batch_size: int = 8,
) -> tuple[list[tuple[F32, F32]], list[tuple[F32, F32]]]:
    """The model's `align(target, source)` outputs (mapping (2, h, w), confidence (h, w))
    for every frame i >= 1 towards frame 0 (`anchor`) and towards frame i - 1 (`chain`; the
    pair for frame 1 is the anchor pair, computed once). Features once per frame."""
    images = torch.stack([image_to_tensor(f, input_size) for f in frames]).to(device)
    features = torch.cat(
        [model.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    count = len(frames)

    def align(targets: list[int], sources: list[int]) -> list[tuple[F32, F32]]:
        out: list[tuple[F32, F32]] = []
        for i in range(0, len(targets), batch_size):
            t, s = targets[i : i + batch_size], sources[i : i + batch_size]
            aligned = model.align(features[t], features[s])
            mapping = aligned["mapping"].float().cpu().numpy()
            confidence = aligned["confidence"][:, 0].float().cpu().numpy()
            out.extend(zip(mapping, confidence, strict=True))
        return out

    anchor = align(list(range(1, count)), [0] * (count - 1))
    chain = anchor[:1] + align(list(range(2, count)), list(range(1, count - 1)))
    return anchor, chain


def backward_field(
    mapping: F32, confidence: F32, size: tuple[int, int], source_size: tuple[int, int]
) -> tuple[F32, F32]:
    """Per target pixel its source pixel (H, W, 2) and confidence (H, W), from the align
    head's `align(target, source)` outputs, exactly as the service converts them."""
    positions = mapping_to_target_pixels(mapping, size, source_size)
    dense = resize_field(np.ascontiguousarray(confidence, np.float32)[..., None], size)[..., 0]
    return positions, np.asarray(dense, np.float32)


def propagate_both(
    annotation: Labels,
    anchor: Sequence[tuple[F32, F32]],
    chain: Sequence[tuple[F32, F32]],
    size: tuple[int, int],
    *,
    frames: Sequence[RGB] | None = None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    fallback_reliability: float = DEFAULT_FALLBACK_RELIABILITY,
) -> dict[str, tuple[list[Labels], list[float]]]:
    """Masks and per-frame reliabilities of frames 1..N-1 for every mode, from the raw
    alignments (`backward_alignments`); frames of `size` (H, W). The `_colour` modes need
    the `frames` (frame 0 the annotated one) and are left out without them."""
    source_size = annotation.shape[:2]
    modes = MODES if frames is not None else tuple(m for m in MODES if "colour" not in m)
    results: dict[str, tuple[list[Labels], list[float]]] = {m: ([], []) for m in modes}
    previous = {"chain": annotation, "chain_colour": annotation}
    for step, ((a_map, a_conf), (c_map, c_conf)) in enumerate(zip(anchor, chain, strict=True)):
        a_field, a_dense = backward_field(a_map, a_conf, size, source_size)
        # Frame 1's previous frame is the annotated one: chain_step then warps directly.
        c_field, c_dense = (None, None) if step == 0 else backward_field(c_map, c_conf, size, size)
        direct = propagate_mask(annotation, a_field, a_dense, min_confidence=min_confidence)
        reliable = reliable_fraction(a_dense, min_confidence)
        refine = None
        if frames is not None:
            grid = (int(a_map.shape[-2]), int(a_map.shape[-1]))
            refine = colour_refiner(frames[0], annotation, frames[step + 1], grid)
            results["anchor_colour"][0].append(refine(direct))
            results["anchor_colour"][1].append(reliable)
        results["anchor"][0].append(direct)
        results["anchor"][1].append(reliable)
        for mode in ("chain", "chain_colour") if frames is not None else ("chain",):
            chained = chain_step(
                previous[mode],
                c_field,
                c_dense,
                annotation,
                a_field,
                a_dense,
                min_confidence=min_confidence,
                fallback_reliability=fallback_reliability,
                refine=refine if mode == "chain_colour" else None,
            )
            previous[mode] = chained.mask
            results[mode][0].append(chained.mask)
            results[mode][1].append(chained.reliability)
        results["identity"][0].append(annotation)
        results["identity"][1].append(1.0)
    return results


def _small(image: RGB, factor: int) -> RGB:
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((width // factor, height // factor), Image.Resampling.BOX)
    return np.asarray(small)


def _outline(mask: Labels) -> NDArray[np.bool_]:
    """Pixels of the foreground whose 4-neighbourhood leaves it (one-pixel boundary)."""
    fg = np.asarray(mask) != 0
    inner = fg.copy()
    inner[1:] &= fg[:-1]
    inner[:-1] &= fg[1:]
    inner[:, 1:] &= fg[:, :-1]
    inner[:, :-1] &= fg[:, 1:]
    outline: NDArray[np.bool_] = fg & ~inner
    return outline


def sequence_strip(
    name: str,
    frames: Sequence[RGB],
    truth: Sequence[Labels],
    results: dict[str, tuple[list[Labels], list[float]]],
    shown: Sequence[int],
    factor: int = 4,
) -> RGB:
    """A picture per shown frame and mode (rows: every mode but identity): the propagated
    mask tinted, the annotation's outline in white, captioned with J and the reliability."""
    cells: list[RGB] = []
    for mode in (m for m in PROPAGATING if m in results):
        masks, reliabilities = results[mode]
        for frame in shown:
            mask = masks[frame - 1]
            picture = overlay_labels(frames[frame], (mask != 0).astype(np.uint8), alpha=0.45)
            picture[_outline(truth[frame])] = 255
            iou = mask_iou(mask, truth[frame])
            caption = f"{name} {mode} #{frame} J={iou:.2f} rel={reliabilities[frame - 1]:.2f}"
            cells.append(captioned(_small(picture, factor), caption))
    return tile(cells, columns=len(shown))


def evaluate_davis(
    model: JLAD,
    data: Path,
    out: Path,
    *,
    input_size: tuple[int, int],
    device: torch.device,
    figures: int = 5,
    docs_img: Path | None = None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    fallback_reliability: float = DEFAULT_FALLBACK_RELIABILITY,
) -> dict[str, Any]:
    """J (mean IoU over frames 1..N-1) per sequence for anchor, chain and identity, the
    per-frame reliabilities and their Pearson correlation with per-frame J, and a PNG strip
    per sequence showing `figures` frames of both modes. `data`: the DAVIS folder or the
    folder holding `davis2016-sample/`."""
    root = davis_root(data)
    names = sorted(p.name for p in (root / "JPEGImages" / "480p").iterdir() if p.is_dir())
    sequences: dict[str, Any] = {}
    per_frame_j: dict[str, list[float]] = {m: [] for m in MODES}
    per_frame_r: dict[str, list[float]] = {m: [] for m in MODES}
    for name in tqdm(names, desc="davis sequences", unit="seq"):
        frames, truth = load_sequence(root, name)
        anchor, chain = backward_alignments(model, frames, input_size=input_size, device=device)
        results = propagate_both(
            truth[0],
            anchor,
            chain,
            truth[0].shape[:2],
            frames=frames,
            min_confidence=min_confidence,
            fallback_reliability=fallback_reliability,
        )
        record: dict[str, Any] = {"frames": len(frames)}
        for mode in MODES:
            masks, reliabilities = results[mode]
            js = [mask_iou(m, t) for m, t in zip(masks, truth[1:], strict=True)]
            per_frame_j[mode] += js
            per_frame_r[mode] += reliabilities
            record[mode] = {
                "J": mean(js),
                "reliability_pearson": pearson(reliabilities, js),
                "mean_reliability": mean(reliabilities),
                "per_frame_J": [round(j, 4) for j in js],
                "per_frame_reliability": [round(r, 4) for r in reliabilities],
            }
        sequences[name] = record
        log.info(
            "davis %-14s J %s",
            name,
            "  ".join(f"{mode} {record[mode]['J']:.3f}" for mode in MODES),
        )
        if figures > 0:
            shown = np.linspace(1, len(frames) - 1, figures).round().astype(int).tolist()
            strip = sequence_strip(name, frames, truth, results, shown)
            save_png(out / "davis" / f"davis_{name}.png", strip)
            if docs_img is not None:
                save_png(docs_img / f"davis_{name}.png", strip)
    methods: dict[str, dict[str, float]] = {
        mode: {"J": mean([sequences[s][mode]["J"] for s in names])} for mode in MODES
    }
    for mode in PROPAGATING:  # identity has no reliability to speak of
        methods[mode]["reliability_pearson"] = pearson(per_frame_r[mode], per_frame_j[mode])
    return {
        "methods": methods,
        "sequences": sequences,
        "num_sequences": len(names),
        "min_confidence": min_confidence,
        "fallback_reliability": fallback_reliability,
        "protocol": "frame 0's annotation carried to frames 1..N-1 at full resolution; J = "
        "foreground IoU with the annotation, mean over frames, then over sequences; anchor: "
        "from frame 0 (/propagate's rule, reliability = reliable_fraction); chain: "
        "jlad_client.sequence.chain_step (reliability = agreement with the directly warped "
        "mask); identity: frame 0's mask copied; reliability_pearson over every frame of "
        "every sequence (NaN when the reliability is constant); *_colour: the same with "
        "jlad_client.masks.refine_by_colour (frame 0's colours, one cell around boundaries)",
    }
