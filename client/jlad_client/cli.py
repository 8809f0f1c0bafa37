"""`jlad`: the command line client of a running jlad service.

    jlad models
    jlad landmarks photo.jpg --out runs/landmarks
    jlad correspond a.jpg b.jpg --resolution target --out runs/pair
    jlad propagate --mask frame000_mask.png frames/frame000.png frames/ --out runs/masks

The service URL and API key come from `--url` / `--api-key`, else `$JLAD_URL` /
`$JLAD_API_KEY`. Exit status: 0 done, 1 the service answered an error, 2 bad usage,
3 the service could not be reached.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jlad_client._version import __version__
from jlad_client.client import DEFAULT_URL, JladClient, RetryPolicy
from jlad_client.errors import ProblemError, TransportError
from jlad_client.flowio import write_flo
from jlad_client.images import list_frames, mask_to_png, read_mask, read_rgb
from jlad_client.masks import DEFAULT_MIN_CONFIDENCE, overlay_labels
from jlad_client.sequence import (
    DEFAULT_FALLBACK_RELIABILITY,
    FrameMask,
    propagate_sequence,
    summarise,
)
from jlad_client.viz import draw_matches, draw_points, flow_to_rgb, heat_rgb, to_png
from jlad_client.warp import sample_bilinear

log = logging.getLogger("jlad_client.cli")

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

EPILOG = f"""\
examples:
  jlad models
  jlad landmarks face.jpg --out runs/lm
  jlad correspond cat1.jpg cat2.jpg --points 40,52 --points 120,80 --out runs/pair
  jlad propagate --mask anno/0001.png frames/0001.png frames/ --out runs/masks
  jlad propagate --mode chain --mask m.png frames/0001.png frames/ --out runs/masks
  JLAD_URL=https://jlad.example.org JLAD_API_KEY=secret jlad models

environment:
  JLAD_URL      service root when --url is not given (default {DEFAULT_URL})
  JLAD_API_KEY  API key when --api-key is not given (sent as X-API-Key)
"""


def _connection_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("service")
    group.add_argument(
        "--url", default=None, help=f"service root (default: $JLAD_URL, else {DEFAULT_URL})"
    )
    group.add_argument("--api-key", default=None, help="API key (default: $JLAD_API_KEY)")
    group.add_argument("--model", default=None, help="model name (default: the service's)")
    group.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per request (default: %(default)s)"
    )
    group.add_argument(
        "--retries",
        type=int,
        default=4,
        help="retries on 429/503 and failed connections (default: %(default)s)",
    )
    group.add_argument("-v", "--verbose", action="store_true", help="log each request and retry")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The `jlad` argument parser (all sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="jlad",
        description="Client of a jlad service: correspondence, landmarks, mask propagation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jlad-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = _connection_parent()
    fmt = argparse.RawDescriptionHelpFormatter

    models = sub.add_parser(
        "models",
        parents=[parent],
        formatter_class=fmt,
        help="list the served models",
        epilog="example:\n  jlad models --json",
    )
    models.add_argument("--json", action="store_true", help="print the full answer as JSON")

    health = sub.add_parser(
        "health",
        parents=[parent],
        formatter_class=fmt,
        help="check /healthz and /readyz",
        epilog="example:\n  jlad health --url http://127.0.0.1:8000",
    )
    health.add_argument("--json", action="store_true", help="print the answers as JSON")

    lm = sub.add_parser(
        "landmarks",
        parents=[parent],
        formatter_class=fmt,
        help="landmarks of one or more images",
        epilog=(
            "examples:\n  jlad landmarks face.jpg\n  jlad landmarks imgs/*.jpg --out runs/lm --json"
        ),
    )
    lm.add_argument("images", nargs="+", type=Path, metavar="IMG", help="image files")
    lm.add_argument("--out", type=Path, default=None, help="folder for <name>_landmarks.png/.json")
    lm.add_argument("--json", action="store_true", help="print results as JSON lines")

    co = sub.add_parser(
        "correspond",
        parents=[parent],
        formatter_class=fmt,
        help="dense correspondence of two images",
        epilog=(
            "examples:\n  jlad correspond a.jpg b.jpg\n"
            "  jlad correspond a.jpg b.jpg --resolution target --out runs/ab\n"
            "  jlad correspond a.jpg b.jpg --points 10,20 --points 30.5,41 --json"
        ),
    )
    co.add_argument("source", type=Path, metavar="A", help="source image")
    co.add_argument("target", type=Path, metavar="B", help="target image")
    co.add_argument(
        "--resolution",
        choices=["grid", "source", "target"],
        default="target",
        help="where the field is sampled (default: %(default)s: a backward field, warps A onto B)",
    )
    co.add_argument(
        "--points",
        action="append",
        default=[],
        metavar="X,Y",
        help="a source point to match (repeatable)",
    )
    co.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="array precision on the wire",
    )
    co.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for flow.flo, flow.png, confidence.png, warped.png, matches.png",
    )
    co.add_argument("--json", action="store_true", help="print the summary as JSON")

    pr = sub.add_parser(
        "propagate",
        parents=[parent],
        formatter_class=fmt,
        help="carry a mask from an annotated image to a folder of frames",
        epilog=(
            "examples:\n"
            "  jlad propagate --mask anno.png frames/0001.png frames/ --out runs/masks\n"
            "  jlad propagate --mode chain --fallback-reliability 0.6 \\\n"
            "       --mask anno.png frames/0001.png frames/ --out runs/masks\n\n"
            "modes:\n"
            "  anchor  every frame from the annotated image; frames sent --batch-size at a time,\n"
            "          the service computes the annotated image's features once per request\n"
            "  chain   frame to frame, held to the annotated image: each frame is also warped\n"
            "          straight from it, pixels whose direct match is reliable keep that label,\n"
            "          the others take the chained one; reliability = agreement (IoU) of the\n"
            "          chained and direct masks; below --fallback-reliability the frame takes\n"
            "          the direct mask and the chain restarts from it\n\n"
            "outputs: OUT/masks/<frame>.png (labels kept), OUT/overlays/<frame>.png,\n"
            "         OUT/summary.json"
        ),
    )
    pr.add_argument("source", type=Path, metavar="SOURCE", help="the annotated image")
    pr.add_argument(
        "frames",
        type=Path,
        metavar="FRAMES",
        help="folder of frames (natural sort order) or one image",
    )
    pr.add_argument(
        "--mask",
        type=Path,
        required=True,
        metavar="M",
        help="label mask of SOURCE (PNG; 0 = background)",
    )
    pr.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    pr.add_argument(
        "--mode",
        choices=["anchor", "chain"],
        default="anchor",
        help="propagation mode (default: %(default)s)",
    )
    pr.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="frames per request in anchor mode (default: %(default)s)",
    )
    pr.add_argument(
        "--refine",
        choices=["none", "colour"],
        default="none",
        help="colour: move the mask boundaries onto each frame's colours (frames of one "
        "video: DAVIS sample J 0.575 -> 0.712 from frame 0); not across different objects "
        "(default: %(default)s)",
    )
    pr.add_argument(
        "--min-confidence",
        type=float,
        default=DEFAULT_MIN_CONFIDENCE,
        help="matches below this confidence are unreliable: their pixels become background "
        "(default: %(default)s)",
    )
    pr.add_argument(
        "--keep-if-neighbours-agree",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep an unreliable pixel's label when the 3x3 source neighbourhood of its match "
        "carries that one label (default: on; --no-keep-if-neighbours-agree drops every "
        "unreliable pixel)",
    )
    pr.add_argument(
        "--fallback-reliability",
        type=float,
        default=DEFAULT_FALLBACK_RELIABILITY,
        help="chain mode: when the chained mask agrees (IoU) less than this with the mask "
        "warped straight from the annotated image, the frame takes the latter "
        "(default: %(default)s)",
    )
    pr.add_argument("--no-overlays", action="store_true", help="write masks only")
    return parser


def _client(args: argparse.Namespace) -> JladClient:
    return JladClient(
        args.url,
        args.api_key,
        model=args.model,
        timeout=args.timeout,
        retry=RetryPolicy(max_retries=max(0, args.retries)),
    )


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _cmd_models(args: argparse.Namespace, client: JladClient) -> int:
    models = client.models()
    if args.json:
        print(
            json.dumps(
                [{**asdict(m), "manifest": m.manifest} for m in models], indent=2, default=str
            )
        )
        return EXIT_OK
    print(f"{'model':<16}{'version':<9}{'input':<11}{'K':>3}  description")
    for m in models:
        size = f"{m.input_size.width}x{m.input_size.height}" if m.input_size else "?"
        star = "*" if m.is_default else " "
        print(
            f"{m.name + star:<16}{m.version:<9}{size:<11}{m.num_landmarks or '?':>3}"
            f"  {m.description}"
        )
    print(f"{len(models)} model(s) at {client.base_url} (* = default)")
    return EXIT_OK


def _cmd_health(args: argparse.Namespace, client: JladClient) -> int:
    alive = client.health()
    ready = client.ready()
    if args.json:
        print(json.dumps({"healthz": alive, "readyz": ready.body, "ready": ready.ready}, indent=2))
    else:
        print(f"alive: {alive}")
        print(f"ready: {ready.ready} ({ready.status_code}) {ready.body}")
    return EXIT_OK if ready.ready else EXIT_PROBLEM


def _cmd_landmarks(args: argparse.Namespace, client: JladClient) -> int:
    for path in tqdm(args.images, desc="landmarks", unit="img", disable=len(args.images) < 2):
        result = client.landmarks(path)
        record = {
            "image": str(path),
            "model": asdict(result.model),
            "image_size": asdict(result.image_size),
            "landmarks": [asdict(lm) for lm in result.landmarks],
            "timings_ms": result.timings_ms,
        }
        if args.json:
            print(json.dumps(record))
        else:
            tqdm.write(
                f"{path}: {len(result.landmarks)} landmarks "
                f"({result.model.name} v{result.model.version})"
            )
            for lm in result.landmarks:
                tqdm.write(
                    f"  {lm.index:>2}  x={lm.x:8.2f}  y={lm.y:8.2f}  confidence={lm.confidence:.3f}"
                )
        if args.out is not None:
            picture = draw_points(read_rgb(path), result.points)
            _write(args.out / f"{path.stem}_landmarks.png", to_png(picture))
            _write(args.out / f"{path.stem}_landmarks.json", json.dumps(record, indent=2).encode())
    if args.out is not None:
        print(f"wrote {2 * len(args.images)} files to {args.out}")
    return EXIT_OK


def _parse_point(text: str) -> list[float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"a point is X,Y (got {text!r})") from error
    return [x, y]


def _cmd_correspond(args: argparse.Namespace, client: JladClient) -> int:
    points = [_parse_point(p) for p in args.points]
    result = client.correspond(
        args.source,
        args.target,
        resolution=args.resolution,
        dtype=args.dtype,
        points=points or None,
    )
    magnitude = np.linalg.norm(result.flow, axis=-1)
    summary: dict[str, Any] = {
        "model": asdict(result.model),
        "source_size": asdict(result.source_size),
        "target_size": asdict(result.target_size),
        "resolution": asdict(result.resolution),
        "direction": result.direction,
        "mean_flow_px": float(magnitude.mean()),
        "mean_confidence": float(result.confidence.mean()),
        "matches": [asdict(m) for m in result.matches],
        "timings_ms": result.timings_ms,
    }
    written: list[str] = []
    if args.out is not None:
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        write_flo(out / "flow.flo", result.flow)
        written.append("flow.flo")
        _write(out / "flow.png", to_png(flow_to_rgb(result.flow)))
        _write(out / "confidence.png", to_png(heat_rgb(result.confidence)))
        written += ["flow.png", "confidence.png"]
        if result.direction == "target->source":
            warped = sample_bilinear(read_rgb(args.source), result.backward_field())
            _write(out / "warped.png", to_png(np.clip(warped, 0, 255).round().astype(np.uint8)))
            written.append("warped.png")
        if result.matches:
            src = np.array([m.source for m in result.matches], np.float32)
            tgt = np.array([m.target for m in result.matches], np.float32)
            conf = np.array([m.confidence for m in result.matches], np.float32)
            picture = draw_matches(read_rgb(args.source), read_rgb(args.target), src, tgt, conf)
            _write(out / "matches.png", to_png(picture))
            written.append("matches.png")
        _write(out / "summary.json", json.dumps(summary, indent=2).encode())
        written.append("summary.json")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{args.source} -> {args.target}: "
            f"{result.resolution.width}x{result.resolution.height} field ({result.direction}), "
            f"mean |flow| {summary['mean_flow_px']:.2f} px, "
            f"mean confidence {summary['mean_confidence']:.3f}"
        )
        for m in result.matches:
            print(
                f"  ({m.source[0]:.1f}, {m.source[1]:.1f}) -> "
                f"({m.target[0]:.1f}, {m.target[1]:.1f})  confidence {m.confidence:.3f}"
            )
        if written:
            print(f"wrote {', '.join(written)} to {args.out}")
    return EXIT_OK


def _frame_list(frames: Path) -> list[Path]:
    if frames.is_dir():
        found = list_frames(frames)
        if not found:
            raise FileNotFoundError(f"no image files in {frames}")
        return found
    if frames.is_file():
        return [frames]
    raise FileNotFoundError(f"{frames} is neither a folder nor a file")


def _cmd_propagate(args: argparse.Namespace, client: JladClient) -> int:
    frames = _frame_list(args.frames)
    source = args.source.resolve()
    anchor_index = next((i for i, f in enumerate(frames) if f.resolve() == source), None)
    mask = read_mask(args.mask)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    masks_dir, overlays_dir = args.out / "masks", args.out / "overlays"
    masks_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_overlays:
        overlays_dir.mkdir(parents=True, exist_ok=True)
    labels_in = sorted(int(v) for v in np.unique(mask))
    log.info("%d frames, labels %s, mode %s", len(frames), labels_in, args.mode)
    started = time.perf_counter()
    results: list[FrameMask] = []
    per_frame: list[dict[str, Any]] = []
    with tqdm(total=len(frames), desc=f"propagate ({args.mode})", unit="frame") as bar:
        for item in propagate_sequence(
            client,
            args.source,
            mask,
            frames,
            mode=args.mode,
            anchor_index=anchor_index,
            batch_size=args.batch_size,
            min_confidence=args.min_confidence,
            keep_if_neighbours_agree=args.keep_if_neighbours_agree,
            fallback_reliability=args.fallback_reliability,
            model=args.model,
            refine=args.refine,
        ):
            frame = frames[item.index]
            _write(masks_dir / f"{frame.stem}.png", mask_to_png(item.mask))
            if not args.no_overlays:
                _write(
                    overlays_dir / f"{frame.stem}.png",
                    to_png(overlay_labels(read_rgb(frame), item.mask)),
                )
            results.append(item)
            per_frame.append(
                {
                    "index": item.index,
                    "frame": str(frame),
                    "origin": item.origin,
                    "reliability": None
                    if not np.isfinite(item.reliability)
                    else round(item.reliability, 4),
                    "fell_back": item.fell_back,
                    "labels": sorted(int(v) for v in np.unique(item.mask)),
                    "foreground_fraction": round(
                        float(np.count_nonzero(item.mask)) / item.mask.size, 4
                    ),
                }
            )
            bar.set_postfix(reliability=f"{item.reliability:.2f}", origin=item.origin)
            bar.update(1)
    summary = summarise(results, started)
    report = {
        "source": str(args.source),
        "mask": str(args.mask),
        "mode": args.mode,
        "url": client.base_url,
        "summary": asdict(summary),
        "frames": sorted(per_frame, key=lambda r: r["index"]),
    }
    _write(args.out / "summary.json", json.dumps(report, indent=2).encode())
    print(
        f"propagated labels {labels_in} to {summary.frames} frame(s) in {summary.seconds:.1f} s "
        f"({summary.from_anchor} from the annotated image, {summary.from_previous} frame to frame, "
        f"{summary.fallbacks} fallback(s)); mean reliability {summary.mean_reliability:.3f}, "
        f"mean foreground {100 * summary.mean_foreground_fraction:.1f}%"
    )
    print(
        f"masks in {masks_dir}"
        + ("" if args.no_overlays else f", overlays in {overlays_dir}")
        + f", summary in {args.out / 'summary.json'}"
    )
    return EXIT_OK


COMMANDS = {
    "models": _cmd_models,
    "health": _cmd_health,
    "landmarks": _cmd_landmarks,
    "correspond": _cmd_correspond,
    "propagate": _cmd_propagate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `jlad` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        with _client(args) as client:
            return COMMANDS[args.command](args, client)
    except ProblemError as error:
        print(
            f"jlad: the service answered {error.status} {error.title}: {error.detail or ''}",
            file=sys.stderr,
        )
        print(
            f"      type: {error.type}"
            + (f", request {error.request_id}" if error.request_id else ""),
            file=sys.stderr,
        )
        return EXIT_PROBLEM
    except TransportError as error:
        print(f"jlad: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (FileNotFoundError, IsADirectoryError, ValueError, argparse.ArgumentTypeError) as error:
        print(f"jlad: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
