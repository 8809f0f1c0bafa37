"""Mask transfer on TSS through a running jlad service: IoU of warped `mask1` vs `mask2`.

For every pair folder of a TSS tree (`image1.png`, `image2.png`, `mask1.png`, `mask2.png`),
`mask1` is carried onto `image2` with `POST /propagate` and compared with `mask2`. Beside it:
the identity baseline (`mask1` not warped, resized to image2's size when the sizes differ)
and, for the unreliable-pixel rule, three settings of the service: every match trusted
(`min_confidence=0`), the default threshold dropping every unreliable pixel, and the
default rule (the threshold with the 3x3 neighbourhood rule). Writes `tss_mask_iou.json`,
the table `tss_mask_iou.md` and a picture `tss_mask_iou.png` (per pair: image1 with mask1,
image2 with mask2, the identity baseline and the propagated mask with every match trusted).

    python -m service &    # or any running service; JLAD_URL / JLAD_API_KEY to point at it
    python bench/tss_mask_iou.py ../shared/data/tss-sample --out runs/bench/tss_mask_iou
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jlad_client import JladClient, RetryPolicy
from jlad_client.images import read_mask, read_rgb
from jlad_client.masks import DEFAULT_MIN_CONFIDENCE, mask_iou, overlay_labels, resize_mask
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from tqdm import tqdm

TILE_HEIGHT = 128


@dataclass(frozen=True)
class Setting:
    """One unreliable-pixel rule sent to `/propagate`."""

    name: str
    min_confidence: float
    keep_if_neighbours_agree: bool


SETTINGS = (
    Setting("all_matches", 0.0, False),
    Setting("drop_unreliable", DEFAULT_MIN_CONFIDENCE, False),
    Setting("default_rule", DEFAULT_MIN_CONFIDENCE, True),
)
SHOWN = "all_matches"


def foreground(path: Path) -> NDArray[np.uint8]:
    """TSS masks as 0/1: palette masks hold 0/1, grayscale ones 0/255 (with a few
    anti-aliased values on some edges, split at half the maximum)."""
    labels = read_mask(path)
    top = int(labels.max())
    return (labels > top / 2).astype(np.uint8) if top > 0 else labels.astype(np.uint8)


def find_pairs(root: Path) -> list[Path]:
    """Every folder under `root` that holds a TSS pair, sorted."""
    return sorted(p.parent for p in root.rglob("mask1.png") if (p.parent / "image2.png").exists())


def tile(image: NDArray[np.uint8], caption: str) -> Image.Image:
    """A captioned panel `TILE_HEIGHT` pixels high."""
    picture = Image.fromarray(image)
    width = max(1, round(picture.width * TILE_HEIGHT / picture.height))
    picture = picture.resize((width, TILE_HEIGHT), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (width, TILE_HEIGHT + 16), "white")
    canvas.paste(picture, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), caption, fill=(0, 0, 0))
    return canvas


def contact_sheet(rows: list[list[Image.Image]], gap: int = 6) -> Image.Image:
    """Panels laid out row by row on a white canvas."""
    width = max(sum(p.width for p in row) + gap * (len(row) - 1) for row in rows)
    height = sum(max(p.height for p in row) for row in rows) + gap * (len(rows) - 1)
    sheet = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        x = 0
        for panel in row:
            sheet.paste(panel, (x, y))
            x += panel.width + gap
        y += max(p.height for p in row) + gap
    return sheet


def evaluate_pair(
    client: JladClient, folder: Path, root: Path
) -> tuple[dict[str, Any], list[Image.Image]]:
    image1, image2 = folder / "image1.png", folder / "image2.png"
    mask1, mask2 = foreground(folder / "mask1.png"), foreground(folder / "mask2.png")
    identity = mask1 if mask1.shape == mask2.shape else resize_mask(mask1, mask2.shape)
    record: dict[str, Any] = {
        "pair": str(folder.relative_to(root)),
        "image1_size": [mask1.shape[1], mask1.shape[0]],
        "image2_size": [mask2.shape[1], mask2.shape[0]],
        "flip_gt": (folder / "flip_gt.txt").read_text().strip() == "1"
        if (folder / "flip_gt.txt").exists()
        else None,
        "iou_identity": mask_iou(identity, mask2),
    }
    shown: NDArray[np.integer] | None = None
    for setting in SETTINGS:
        started = time.perf_counter()
        result = client.propagate(
            image1,
            mask1,
            [image2],
            min_confidence=setting.min_confidence,
            keep_if_neighbours_agree=setting.keep_if_neighbours_agree,
        )
        elapsed_ms = (time.perf_counter() - started) * 1000
        warped = result.masks[0]
        record[f"iou_{setting.name}"] = mask_iou(warped, mask2)
        record[f"reliable_fraction_{setting.name}"] = result.reliable_fraction[0]
        record[f"request_ms_{setting.name}"] = round(elapsed_ms, 1)
        if setting.name == SHOWN:
            shown = warped
            record["model"] = {"name": result.model.name, "version": result.model.version}
    assert shown is not None
    rgb1, rgb2 = read_rgb(image1), read_rgb(image2)
    panels = [
        tile(overlay_labels(rgb1, mask1), f"{record['pair']}: image1 + mask1"),
        tile(overlay_labels(rgb2, mask2), "image2 + mask2 (truth)"),
        tile(overlay_labels(rgb2, identity), f"identity  IoU {record['iou_identity']:.3f}"),
        tile(overlay_labels(rgb2, shown), f"propagated  IoU {record[f'iou_{SHOWN}']:.3f}"),
    ]
    return record, panels


def markdown_table(records: list[dict[str, Any]], means: dict[str, float]) -> str:
    """The per-pair and mean IoUs as a Markdown table (pasted into docs as it is)."""
    columns = ["iou_identity", *(f"iou_{s.name}" for s in SETTINGS)]
    titles = ["identity (mask1 unwarped)", *(s.name for s in SETTINGS)]
    lines = [
        "| pair | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for record in records:
        cells = " | ".join(f"{record[c]:.3f}" for c in columns)
        lines.append(f"| {record['pair']} | {cells} |")
    lines.append("| **mean** | " + " | ".join(f"**{means[c]:.3f}**" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", type=Path, help="TSS root (e.g. ../shared/data/tss-sample)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/tss_mask_iou"))
    parser.add_argument("--url", default=None, help="service root (default: $JLAD_URL)")
    parser.add_argument("--api-key", default=None, help="API key (default: $JLAD_API_KEY)")
    parser.add_argument("--model", default=None, help="model name (default: the service's)")
    args = parser.parse_args(argv)

    pairs = find_pairs(args.data)
    if not pairs:
        print(f"no TSS pairs (mask1.png + image2.png) under {args.data}", file=sys.stderr)
        return 2
    records: list[dict[str, Any]] = []
    rows: list[list[Image.Image]] = []
    with JladClient(args.url, args.api_key, model=args.model, retry=RetryPolicy(8)) as client:
        client.wait_until_ready(timeout_s=60)
        served = {m.name: m for m in client.models()}
        for folder in tqdm(pairs, desc="tss mask transfer", unit="pair"):
            record, panels = evaluate_pair(client, folder, args.data)
            records.append(record)
            rows.append(panels)
            tqdm.write(
                f"{record['pair']:<22} identity {record['iou_identity']:.3f}  "
                + "  ".join(f"{s.name} {record[f'iou_{s.name}']:.3f}" for s in SETTINGS)
            )
        url = client.base_url

    keys = ["iou_identity", *(f"iou_{s.name}" for s in SETTINGS)]
    means = {k: float(np.mean([r[k] for r in records])) for k in keys}
    model_name = records[0]["model"]["name"]
    info = served.get(model_name)
    report = {
        "benchmark": "TSS mask transfer: IoU(warp(mask1 -> image2), mask2)",
        "data": str(args.data),
        "pairs": len(records),
        "url": url,
        "model": records[0]["model"],
        "model_description": info.description if info else None,
        "provider": info.provider if info else None,
        "settings": [s.__dict__ for s in SETTINGS],
        "mean": means,
        "per_pair": records,
        "host": platform.node(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tss_mask_iou.json").write_text(json.dumps(report, indent=2))
    contact_sheet(rows).save(args.out / "tss_mask_iou.png")
    (args.out / "tss_mask_iou.md").write_text(markdown_table(records, means))
    print(
        f"mean IoU over {len(records)} pairs: identity {means['iou_identity']:.3f}, "
        + ", ".join(f"{s.name} {means[f'iou_{s.name}']:.3f}" for s in SETTINGS)
    )
    print(f"wrote tss_mask_iou.json, .png and .md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
