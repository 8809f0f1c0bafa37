"""The evaluation CLI end to end, on tiny data trees in the real sets' formats.

The trees are built so that the two baselines have known answers: a pair made of one image
twice (or an image and its mirror, flagged in flip_gt.txt) must be matched perfectly by the
identity and by nearest-neighbour matching of identical features; for faces, the identity
baseline (landmarks that never move) regresses to the mean training shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import torch
from jlad_client.coords import rescale_pixels
from jlad_client.flowio import write_flo
from PIL import Image

from model_export.checkpoint import save_checkpoint
from model_export.data import (
    TIGHT_INTER_OCULAR,
    TIGHT_SIZE,
    MTFLFaces,
    MTFLTightFaces,
    affine_points,
    mtfl_split,
    read_mtfl_annotations,
    tight_crop_transform,
    warp_affine,
)
from model_export.evaluate import METHODS, main
from model_export.evaluation.object_landmarks import choose_by_other_classes
from model_export.metrics import landmark_error
from model_export.model import JLAD, ModelConfig
from tests.test_evaluate_davis import write_davis

ROOT = Path(__file__).resolve().parents[1]
INPUT = 64


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random colour texture: every feature cell looks different."""
    coarse = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_tss(root: Path) -> None:
    """Two pairs: image 1 twice (zero flow), and image 1 with its mirror (flip_gt = 1)."""
    h, w = 48, 64
    image = texture(h, w, 0)
    mask = np.zeros((h, w), np.uint8)
    mask[10:40, 8:40] = 255
    xs = np.arange(w, dtype=np.float32)
    mirror_flow = np.stack(
        np.broadcast_arrays((w - 1 - 2 * xs)[None, :], np.zeros((h, 1))), axis=-1
    ).astype(np.float32)
    for name, image2, mask2, flow, flip in [
        ("same/pair_00", image, mask, np.zeros((h, w, 2), np.float32), "0"),
        ("mirror/pair_01", image[:, ::-1], mask[:, ::-1], mirror_flow, "1"),
    ]:
        folder = root / name
        save(folder / "image1.png", image)
        save(folder / "image2.png", np.ascontiguousarray(image2))
        save(folder / "mask1.png", mask)
        save(folder / "mask2.png", np.ascontiguousarray(mask2))
        write_flo(folder / "flow1.flo", flow)
        write_flo(folder / "flow2.flo", flow)
        (folder / "flip_gt.txt").write_text(flip + "\n")


def write_pf_willow(root: Path) -> None:
    """Two classes. car(S): the same image under two names, with the same keypoints (every
    baseline is perfect). duck(S): the same image again, but the second copy's keypoints sit
    40 px to the right, 4 times the largest PCK radius (0.15 x 60 px): identity gets none."""
    image = texture(60, 80, 1)
    points = np.array([[10.0, 30, 50, 70], [12.0, 40, 20, 50]])  # 2 x N
    for name in ("Cars_001", "Cars_002"):
        save(root / "car(S)" / f"{name}.png", image)
        scipy.io.savemat(root / "car(S)" / f"{name}.mat", {"pts_coord": points})
    wide = texture(60, 120, 3)
    for name, shift in (("060_0001", 0.0), ("060_0002", 40.0)):
        save(root / "duck(S)" / f"{name}.png", wide)
        moved = points + np.array([[shift], [0.0]])
        scipy.io.savemat(root / "duck(S)" / f"{name}.mat", {"pts_coord": moved})


def write_mtfl(root: Path, count: int = 12) -> None:
    rng = np.random.default_rng(2)
    lines = []
    for i in range(count):
        save(root / "lfw_5590" / f"face_{i:02d}.jpg", texture(80, 80, 10 + i))
        pts = np.array([[30, 35], [50, 35], [40, 45], [32, 55], [48, 55]], float)
        pts += rng.uniform(-3, 3, pts.shape)
        lines.append(
            " ".join([f"lfw_5590/face_{i:02d}.jpg", *map(str, pts[:, 0]), *map(str, pts[:, 1])])
        )
    (root / "new_training.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`data/` with pf-willow-sample, tss-sample, mtfl-train; `checkpoints/` with small
    untrained objects and faces models (real backbone weights, 64 x 64 input)."""
    root = tmp_path_factory.mktemp("eval")
    write_pf_willow(root / "data" / "pf-willow-sample")
    write_tss(root / "data" / "tss-sample")
    write_mtfl(root / "data" / "mtfl-train")
    write_davis(root / "data" / "davis2016-sample")
    torch.manual_seed(0)
    for name in ("objects", "faces"):
        model = JLAD(ModelConfig(input_size=(INPUT, INPUT)))
        # The faces split comes from the training config (val_fraction, seed).
        config = {"description": "test", "val_fraction": 0.25, "seed": 0}
        save_checkpoint(root / "checkpoints" / name, model, config)
    return root


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_tasks_end_to_end(trees: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    out = tmp_path / "eval"
    reports = main(
        [
            "all",
            "--checkpoints",
            str(trees / "checkpoints"),
            "--data",
            str(trees / "data"),
            "--out",
            str(out),
            "--docs-img",
            str(tmp_path / "docs"),
        ]
    )
    assert {"pfwillow", "tss", "faces", "faces-flow", "objects-landmarks", "davis"} <= set(reports)
    # DAVIS tree: frames that never move, so copying frame 0's mask is exact.
    assert reports["davis"]["methods"]["identity"]["J"] == 1.0
    assert is_png(tmp_path / "docs" / "davis_blob-a.png")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["faces"]["checkpoint"].endswith("faces")

    pf = json.loads((out / "objects" / "pfwillow.json").read_text())
    assert pf["num_pairs"] == 4 and set(pf["methods"]) == set(METHODS)
    assert pf["classes"] == ["car(S)", "duck(S)"]
    perfect = {"pck@0.05": 1.0, "pck@0.1": 1.0, "pck@0.15": 1.0}
    for method in ("identity", "nearest_neighbour"):
        assert pf["per_class"]["car(S)"][method] == perfect
    assert pf["per_class"]["duck(S)"]["identity"] == {k: 0.0 for k in perfect}
    # Each class counts once in `methods`: (1 + 0) / 2.
    assert pf["methods"]["identity"] == {k: 0.5 for k in perfect}
    assert all(0 <= v <= 1 for v in pf["methods"]["model"].values())
    figures = sorted((out / "objects" / "pfwillow").glob("*.png"))
    assert len(figures) == 2 and all(is_png(p) for p in figures)  # one pair per class

    tss = json.loads((out / "objects" / "tss.json").read_text())
    assert [p["flip"] for p in tss["pairs"]] == [True, False]  # mirror/ sorts before same/
    for pair in tss["pairs"]:
        for method in ("identity", "nearest_neighbour"):
            assert pair[method]["flow_accuracy"] == 1.0, (pair["name"], method)
            assert pair[method]["mask_iou"] == 1.0, (pair["name"], method)
        assert 0 <= pair["model"]["flow_accuracy"] <= 1
    assert set(tss["per_subset"]) == {"mirror", "same"}
    assert len(list((out / "objects" / "tss").glob("*.png"))) == 2

    faces = json.loads((out / "faces" / "faces.json").read_text())
    assert (faces["num_train"], faces["num_val"]) == (9, 3)  # val_fraction from the config
    assert set(faces["methods"]) == {"model", "nearest_neighbour", "mean_shape"}
    data = trees / "data" / "mtfl-train"
    records = read_mtfl_annotations(data / "new_training.txt")
    train, val = mtfl_split(data, 0.25, seed=0)
    scaled = [rescale_pixels(r.points, (80, 80), (INPUT, INPUT)) for r in records]
    mean_shape = np.mean([scaled[i] for i in train], axis=0)
    truth = np.stack([scaled[i] for i in val])
    expected = landmark_error(np.broadcast_to(mean_shape, truth.shape), truth)
    assert faces["methods"]["mean_shape"]["landmark_error_percent"] == pytest.approx(
        expected, rel=1e-4
    )
    # Tight crops: the mean shape of the tight training crops, on the tight val crops.
    tight = {
        split: np.stack(
            [f["points"].numpy() for f in MTFLTightFaces(data, (INPUT, INPUT), split, 0.25)]
        )
        for split in ("train", "val")
    }
    expected = landmark_error(
        np.broadcast_to(tight["train"].mean(axis=0), tight["val"].shape), tight["val"]
    )
    assert faces["methods"]["mean_shape"]["tight_landmark_error_percent"] == pytest.approx(
        expected, rel=1e-4
    )
    assert faces["sets"]["tight"]["val_inter_ocular_px"] == pytest.approx(
        TIGHT_INTER_OCULAR, rel=1e-3
    )
    for key in ("landmark_error_percent", "tight_landmark_error_percent"):
        assert np.isfinite(faces["methods"]["model"][key])
    for name in ("as_cropped", "tight"):
        for png in ("landmarks.png", "regressed.png"):
            assert is_png(out / "faces" / "faces" / name / png)
        assert is_png(tmp_path / "docs" / f"faces_{name}.png")

    flow = json.loads((out / "faces" / "faces-flow.json").read_text())
    assert flow["num_pairs"] == 3 and set(flow["methods"]) == set(METHODS)  # the val faces
    assert flow["cell"] == pytest.approx(2 / (INPUT // 8))
    for figures in flow["methods"].values():
        assert 0 <= figures["within_one_cell"] <= 1
        assert figures["epe_median"] >= 0 and figures["epe_mean"] >= 0
    assert flow["methods"]["identity"]["epe_mean"] > 0.05  # the two views differ
    assert is_png(out / "faces" / "faces-flow" / "matches.png")
    assert is_png(tmp_path / "docs" / "faces_flow.png")

    objects = json.loads((out / "objects" / "objects-landmarks.json").read_text())
    car, duck = objects["per_class"]["car(S)"], objects["per_class"]["duck(S)"]
    # car(S): one image twice: the same landmarks, so they land on the same parts and the
    # one-image regressor reproduces the other copy's keypoints; so does the mean shape.
    assert car["model"]["part_purity"] == 1.0
    assert car["model"]["regressor_error_percent"] == pytest.approx(0.0, abs=1e-3)
    assert car["mean_shape"]["regressor_error_percent"] == pytest.approx(0.0, abs=1e-9)
    # duck(S): the other copy's keypoints are 40 px off, L = 60 px.
    assert duck["mean_shape"]["regressor_error_percent"] == pytest.approx(100 * 40 / 60)
    assert objects["methods"]["mean_shape"]["regressor_error_percent"] == pytest.approx(
        100 * 40 / 60 / 2
    )
    assert 0 <= objects["methods"]["model"]["spread_percent"] <= 100
    for name in ("car_S", "duck_S"):
        assert is_png(out / "objects" / "objects_landmarks" / f"{name}.png")
        assert is_png(tmp_path / "docs" / f"objects_landmarks_{name}.png")


def test_single_task_updates_checkpoint_metrics(trees: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "objects"
    checkpoint.mkdir()
    for f in (trees / "checkpoints" / "objects").iterdir():
        (checkpoint / f.name).write_bytes(f.read_bytes())
    main(
        [
            "pfwillow",
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(trees / "data" / "pf-willow-sample" / "car(S)"),
            "--out",
            str(tmp_path / "o"),
            "--figures",
            "0",
            "--update-checkpoint-metrics",
        ]
    )
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    assert metrics["pfwillow"]["methods"]["identity"]["pck@0.1"] == 1.0
    assert not list((tmp_path / "o").glob("pfwillow/*.png"))


def evaluate_one(task: str, checkpoint: Path, data: Path, out: Path, *options: str) -> Any:
    """The evaluation CLI on one task and checkpoint: that task's report."""
    argv = [task, "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]
    return main([*argv, *options])[task]


def test_choose_by_other_classes_never_sees_the_class_it_scores() -> None:
    errors = {
        1.0: {"a": 1.0, "b": 5.0, "c": 5.0},
        2.0: {"a": 9.0, "b": 2.0, "c": 2.0},
        3.0: {"a": 0.0, "b": 4.0, "c": 9.0},
    }
    # Means over the other classes: without a, 2.0 (2.0 on b and c); without b, 1.0 (3.0 on a
    # and c); without c, 3.0 (2.0 on a and b). Each scored on the class left out.
    assert choose_by_other_classes(errors) == {"a": (2.0, 9.0), "b": (1.0, 5.0), "c": (3.0, 9.0)}
    # Ties go to the setting listed first.
    assert choose_by_other_classes({2.0: {"a": 1.0, "b": 1.0}, 1.0: {"a": 1.0, "b": 1.0}}) == {
        "a": (2.0, 1.0),
        "b": (2.0, 1.0),
    }
    assert choose_by_other_classes({1.0: {"a": 1.0}}) == {}  # no other class to choose on


def test_objects_landmarks_sharpness_sweep(trees: Path, tmp_path: Path) -> None:
    report = evaluate_one(
        "objects-landmarks",
        trees / "checkpoints" / "objects",
        trees / "data" / "pf-willow-sample",
        tmp_path,
        "--figures",
        "0",
        "--sharpness-sweep",
        "1,4",
    )
    sweep = report["sharpness_sweep"]
    assert report["heatmap_sharpness"] == 1.0  # the sweep leaves the served value alone
    assert set(sweep["values"]) == {"1.0", "4.0"}
    # Sharpness 1 is the checkpoint as served: the sweep's figures are the report's.
    assert sweep["values"]["1.0"]["methods"] == report["methods"]
    assert sweep["values"]["4.0"]["methods"] != report["methods"]
    for category, choice in sweep["chosen_on_other_classes"].items():
        assert choice["sharpness"] in (1.0, 4.0)
        at = sweep["values"][str(choice["sharpness"])]["regressor_error_percent"][category]
        assert choice["regressor_error_percent"] == at


def test_committed_objects_checkpoint_evaluates(trees: Path, tmp_path: Path) -> None:
    report = evaluate_one(
        "pfwillow",
        ROOT / "checkpoints" / "objects",
        trees / "data" / "pf-willow-sample",
        tmp_path,
        "--figures",
        "1",
    )
    figures = report["per_class"]["car(S)"]
    assert figures["identity"]["pck@0.1"] == 1.0
    assert figures["nearest_neighbour"]["pck@0.1"] == 1.0
    assert 0 <= figures["model"]["pck@0.1"] <= 1


# --- tight face crops ----------------------------------------------------------------------


FACE = np.array([[80.0, 90], [100, 90], [90, 100], [83, 112], [97, 112]])


def test_tight_crop_places_and_scales_from_the_points() -> None:
    a, b = tight_crop_transform(FACE, np.random.default_rng(0), max_shift=0, max_rotation_deg=0)
    crop = affine_points(FACE, a, b)
    assert np.linalg.norm(crop[0] - crop[1]) == pytest.approx(TIGHT_INTER_OCULAR)
    eyes, mouth = crop[:2].mean(axis=0), crop[3:].mean(axis=0)
    np.testing.assert_allclose((eyes + mouth) / 2, [(TIGHT_SIZE - 1) / 2] * 2, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tight_crop_moves_the_pixels_with_the_points(seed: int) -> None:
    """Bright 3 x 3 dots on the 5 points: after a random shift and rotation, the crop is
    bright where the transformed points say, and the eyes stay 24 px apart."""
    image = np.zeros((200, 200, 3), np.uint8)
    for x, y in FACE.astype(int):
        image[y - 1 : y + 2, x - 1 : x + 2] = 255
    a, b = tight_crop_transform(FACE, np.random.default_rng(seed))
    crop = warp_affine(image, a, b, (TIGHT_SIZE, TIGHT_SIZE))
    points = affine_points(FACE, a, b)
    assert np.linalg.norm(points[0] - points[1]) == pytest.approx(TIGHT_INTER_OCULAR)
    for x, y in points.round().astype(int):
        assert crop[y, x].min() == 255, (seed, x, y)
    assert crop.mean() < 255 * 5 * 16 / TIGHT_SIZE**2  # nothing bright elsewhere


def test_tight_faces_split_matches_and_crops_are_reproducible(tmp_path: Path) -> None:
    write_mtfl(tmp_path)
    faces = MTFLFaces(tmp_path, (INPUT, INPUT), "val", 0.25, 0)
    tight = MTFLTightFaces(tmp_path, (INPUT, INPUT), "val", 0.25, 0, crop_seed=3)
    again = MTFLTightFaces(tmp_path, (INPUT, INPUT), "val", 0.25, 0, crop_seed=3)
    assert tight.indices.tolist() == faces.indices.tolist()
    item = tight[0]
    assert item["image"].shape == (3, INPUT, INPUT)
    assert torch.equal(item["image"], again[0]["image"])
    eyes = item["crop_points"][0] - item["crop_points"][1]
    assert float(eyes.norm()) == pytest.approx(TIGHT_INTER_OCULAR, rel=1e-5)
    np.testing.assert_allclose(
        item["points"].numpy(),
        rescale_pixels(item["crop_points"].numpy(), (TIGHT_SIZE, TIGHT_SIZE), (INPUT, INPUT)),
        rtol=1e-5,
    )


def test_faces_flow_errors_known_answer() -> None:
    """End-point errors count only valid cells; the figures of a known set of errors."""
    from model_export.evaluation.faces_flow import end_point_errors, flow_error_figures

    truth = torch.zeros(1, 2, 2, 2)
    predicted = truth.clone()
    predicted[0, 0, 0, 0] = 0.3  # x off by 0.3
    predicted[0, :, 0, 1] = torch.tensor([0.3, 0.4])  # off by 0.5
    predicted[0, 1, 1, 1] = 9.0  # invalid cell: not counted
    valid = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    errors = end_point_errors(predicted, truth, valid)
    assert sorted(errors.tolist()) == pytest.approx([0.0, 0.3, 0.5])
    figures = flow_error_figures(errors, cell=0.4)
    assert figures == pytest.approx(
        {"epe_mean": 0.8 / 3, "epe_median": 0.3, "within_one_cell": 2 / 3}
    )
