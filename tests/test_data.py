"""The real-data loaders, on tiny data trees written in the formats of the real sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from jlad_client.flowio import write_flo
from PIL import Image

from model_export.data import (
    ClassFolderPairs,
    MTFLFaces,
    PFWillow,
    TSSPairs,
    image_to_tensor,
    mtfl_split,
    read_mask,
    split_indices,
)


def write_image(path: Path, height: int, width: int, value: int = 0, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)


# --- images and splits ---------------------------------------------------------------------


def test_image_to_tensor_shape_range_and_channels() -> None:
    image = np.zeros((30, 40, 3), np.uint8)
    image[..., 0] = 255  # pure red
    tensor = image_to_tensor(image, (16, 24))
    assert tensor.shape == (3, 16, 24) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[0], torch.ones(16, 24))
    torch.testing.assert_close(tensor[1:], torch.zeros(2, 16, 24))


def test_split_indices_is_deterministic_disjoint_and_complete() -> None:
    train, val = split_indices(100, 0.2, seed=5)
    assert len(val) == 20 and len(train) == 80
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(100))
    again = split_indices(100, 0.2, seed=5)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(split_indices(100, 0.2, seed=6)[1], val)
    with pytest.raises(ValueError):
        split_indices(10, 1.0)


def test_read_mask_handles_palette_grey_and_antialiased(tmp_path: Path) -> None:
    values = np.array([[0, 1], [1, 0]], np.uint8)
    palette = Image.fromarray(values, "P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "p.png")
    Image.fromarray(np.array([[0, 255], [127, 200]], np.uint8)).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), values.astype(bool))
    np.testing.assert_array_equal(read_mask(tmp_path / "l.png"), [[False, True], [False, True]])


# --- class folders -------------------------------------------------------------------------


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    for c, (name, count) in enumerate([("ant", 6), ("bee", 4), ("cat", 1), ("dog", 10)]):
        for i in range(count):
            write_image(
                tmp_path / name / f"image_{i:04d}.jpg",
                20 + i,
                30,
                value=10 * c + i,
                mode="L" if i == 0 else "RGB",
            )
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_class_pairs_are_same_class_and_reproducible(class_tree: Path) -> None:
    data = ClassFolderPairs(class_tree, (32, 48), pairs_per_epoch=12, seed=3)
    assert data.classes == ["ant", "bee", "dog"]  # "cat" has a single image
    assert len(data) == 12
    item = data[0]
    assert item["source"].shape == (3, 32, 48) and item["target"].shape == (3, 32, 48)
    assert item["source"].min() >= 0 and item["source"].max() <= 1
    for i in range(12):
        label, source, target = data.pair(i)
        assert source != target and source.parent.name == target.parent.name == data.classes[label]
    assert Path(item["source_path"]).parent.name == item["category"]
    size = tuple(item["source_size"].tolist())
    assert size == Image.open(item["source_path"]).size[::-1]
    same = ClassFolderPairs(class_tree, (32, 48), pairs_per_epoch=12, seed=3)
    assert [same.pair(i) for i in range(12)] == [data.pair(i) for i in range(12)]
    data.set_epoch(1)
    assert [same.pair(i) for i in range(12)] != [data.pair(i) for i in range(12)]


def test_class_pairs_splits_are_disjoint_and_classes_selectable(class_tree: Path) -> None:
    train = ClassFolderPairs(class_tree, (16, 16), split="train", val_fraction=0.3, seed=1)
    val = ClassFolderPairs(class_tree, (16, 16), split="val", val_fraction=0.3, seed=1)
    for mine, theirs in zip(train.images, val.images, strict=False):
        assert set(mine).isdisjoint(theirs)
    picked = ClassFolderPairs(class_tree, (16, 16), classes=["dog", "bee"])
    assert picked.classes == ["bee", "dog"]
    assert ClassFolderPairs(class_tree, (16, 16), max_classes=1).classes == ["ant"]
    with pytest.raises(ValueError, match="zebra"):
        ClassFolderPairs(class_tree, (16, 16), classes=["zebra"])


# --- MTFL ----------------------------------------------------------------------------------


@pytest.fixture
def mtfl_tree(tmp_path: Path) -> Path:
    lines = []
    for i in range(20):
        folder = "lfw_5590" if i < 10 else "net_7876"
        write_image(tmp_path / folder / f"face_{i}.jpg", 80, 80, value=i)
        xs = [30 + i % 3, 50, 40, 32, 48]
        ys = [35, 35, 45, 55, 55 + i % 2]
        lines.append(" ".join([f"{folder}/face_{i}.jpg", *map(str, xs + ys)]))
    (tmp_path / "new_training.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_mtfl_points_are_scaled_and_split_is_shared(mtfl_tree: Path) -> None:
    train = MTFLFaces(mtfl_tree, (40, 40), "train", val_fraction=0.25, seed=2)
    val = MTFLFaces(mtfl_tree, (40, 40), "val", val_fraction=0.25, seed=2)
    assert len(train) == 15 and len(val) == 5
    expected_train, expected_val = mtfl_split(mtfl_tree, 0.25, seed=2)
    np.testing.assert_array_equal(train.indices, expected_train)
    np.testing.assert_array_equal(val.indices, expected_val)
    item = val[0]
    i = int(item["index"])
    assert item["image"].shape == (3, 40, 40)
    assert item["path"].endswith(f"face_{i}.jpg")
    original = np.array([[30 + i % 3, 35], [50, 35], [40, 45], [32, 55], [48, 55 + i % 2]])
    np.testing.assert_allclose(item["original_points"].numpy(), original)
    # 80 -> 40 px: pixel centres map as (x + 0.5) / 2 - 0.5.
    np.testing.assert_allclose(item["points"].numpy(), (original + 0.5) / 2 - 0.5, atol=1e-5)
    few = MTFLFaces(mtfl_tree, (40, 40), "train", 0.25, 2, limit=4)
    assert len(few) == 4 and set(few.indices) <= set(train.indices)
    # Spread through the split, not its first items (the file lists its sources in blocks).
    assert few.indices[0] == train.indices[0] and few.indices[-1] == train.indices[-1]


def test_mtfl_exclusion_keeps_the_split(mtfl_tree: Path) -> None:
    every = MTFLFaces(mtfl_tree, (40, 40), "val", val_fraction=0.5, seed=4)
    kept = MTFLFaces(mtfl_tree, (40, 40), "val", 0.5, 4, exclude=["net_7876/*"])
    assert kept.excluded == sum(r.path.startswith("net_7876/") for r in every.records) > 0
    assert [r.path for r in kept.records] == [
        r.path for r in every.records if r.path.startswith("lfw_5590/")
    ]


def test_mtfl_rejects_malformed_lines(tmp_path: Path) -> None:
    (tmp_path / "new_training.txt").write_text("a.jpg 1 2 3\n")
    with pytest.raises(ValueError, match="10 numbers"):
        MTFLFaces(tmp_path, (40, 40))


# --- TSS -----------------------------------------------------------------------------------


def write_tss_pair(folder: Path, flip: bool, size: tuple[int, int] = (24, 32)) -> np.ndarray:
    h, w = size
    write_image(folder / "image1.png", h, w, value=1)
    write_image(folder / "image2.png", h, w + 4, value=2)
    flow = np.full((h, w, 2), 1e10, np.float32)
    flow[4:12, 6:20] = [3.0, -1.0]
    write_flo(folder / "flow1.flo", flow)
    write_flo(folder / "flow2.flo", np.zeros((h, w + 4, 2), np.float32))
    mask = np.zeros((h, w), np.uint8)
    mask[4:12, 6:20] = 255
    Image.fromarray(mask).save(folder / "mask1.png")
    Image.fromarray(np.zeros((h, w + 4), np.uint8)).save(folder / "mask2.png")
    (folder / "flip_gt.txt").write_text("1\n" if flip else "0\n")
    return flow


def test_tss_pairs_walks_the_tree(tmp_path: Path) -> None:
    flow = write_tss_pair(tmp_path / "JODS" / "car_01_02", flip=False)
    write_tss_pair(tmp_path / "PASCAL" / "bike_01_03", flip=True)
    data = TSSPairs(tmp_path, size=(16, 16))
    assert len(data) == 2
    first, second = data[0], data[1]
    assert first["name"] == "JODS/car_01_02" and second["name"] == "PASCAL/bike_01_03"
    assert first["flip"] is False and second["flip"] is True
    assert first["image1"].shape == (24, 32, 3) and first["image2"].shape == (24, 36, 3)
    np.testing.assert_array_equal(first["flow1"], flow)
    assert first["mask1"].sum() == 8 * 14 and first["mask1"].dtype == bool
    assert first["source"].shape == (3, 16, 16)
    assert "source" not in TSSPairs(tmp_path)[0]


def test_tss_pairs_reports_missing_files(tmp_path: Path) -> None:
    write_tss_pair(tmp_path / "a", flip=False)
    (tmp_path / "a" / "mask2.png").unlink()
    with pytest.raises(ValueError, match=r"mask2\.png"):
        TSSPairs(tmp_path)


# --- PF-WILLOW -----------------------------------------------------------------------------


def write_pf_class(folder: Path, count: int) -> list[np.ndarray]:
    points = []
    for i in range(count):
        write_image(folder / f"img_{i}.png", 30, 40 + i, value=i)
        pts = np.array([[5.0 + i, 10, 20], [7.0, 8 + i, 25]])  # 2 x N: x row, y row
        scipy.io.savemat(folder / f"img_{i}.mat", {"pts_coord": pts})
        points.append(pts.T)
    return points


def test_pf_willow_all_ordered_pairs_per_class(tmp_path: Path) -> None:
    cars = write_pf_class(tmp_path / "car(S)", 3)
    write_pf_class(tmp_path / "duck(S)", 2)
    write_image(tmp_path / "car(S)" / "stray.png", 10, 10)  # no .mat: not part of the set
    data = PFWillow(tmp_path, size=(32, 32))
    assert data.classes == ["car(S)", "duck(S)"]
    assert len(data) == 3 * 2 + 2 * 1
    seen = {
        (data[i]["category"], data[i]["source_name"], data[i]["target_name"])
        for i in range(len(data))
    }
    assert ("car(S)", "img_0", "img_2") in seen and ("car(S)", "img_2", "img_0") in seen
    item = data[1]  # car(S): img_0 -> img_2
    assert (item["source_name"], item["target_name"]) == ("img_0", "img_2")
    np.testing.assert_allclose(item["source_points"], cars[0])
    np.testing.assert_allclose(item["target_points"], cars[2])
    assert item["target_image"].shape == (30, 42, 3) and item["source"].shape == (3, 32, 32)


def test_pf_willow_accepts_a_single_class_folder(tmp_path: Path) -> None:
    write_pf_class(tmp_path / "car(S)", 3)
    data = PFWillow(tmp_path / "car(S)")
    assert data.classes == ["car(S)"] and len(data) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PF-WILLOW class"):
        PFWillow(tmp_path / "empty")
