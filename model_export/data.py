"""Real-image data sets: class-folder pairs, MTFL faces, TSS pairs, PF-WILLOW keypoints.

Every path is passed in; nothing is hard-coded. Images become float32 tensors (3, H, W), RGB
in [0, 1], resized to the requested `size` = (H, W); each item keeps the original size
(and, for the evaluation sets, the original pixels and annotations) so that results can be
mapped back to original pixels with `jlad_client.coords.rescale_pixels`. Coordinates are
pixel (x, y) with pixel centres at integers (docs/CONTRACT.md).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch
from jlad_client.coords import rescale_pixels
from jlad_client.flowio import read_flo
from numpy.typing import NDArray
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

Size = tuple[int, int]
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff"})
Item = dict[str, Any]


# --- images --------------------------------------------------------------------------------


def read_rgb(path: str | Path) -> NDArray[np.uint8]:
    """Read an image file as uint8 RGB (H, W, 3) (grey and palette images are converted)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), np.uint8)


def read_mask(path: str | Path) -> NDArray[np.bool_]:
    """Read a foreground mask image as (H, W) bool.

    Masks come as 0/1 palette images or 0/255 grey images, some with anti-aliased edges:
    values 0/1 mean background/foreground, larger ranges are thresholded at half of 255.
    """
    with Image.open(path) as img:
        values = np.asarray(img.convert("L") if img.mode not in ("L", "P", "1") else img)
    values = values.astype(np.int64)
    if values.max(initial=0) <= 1:
        return values > 0
    return values >= 128


def image_to_tensor(image: NDArray[np.uint8], size: Size) -> Tensor:
    """uint8 RGB (H0, W0, 3) -> float32 (3, H, W) in [0, 1], resized bilinearly to
    `size` = (H, W) (Pillow's resize, which low-pass filters when it shrinks)."""
    height, width = size
    img = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(img, np.float32) / 255.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def load_image(path: str | Path, size: Size) -> tuple[Tensor, Size]:
    """Read an image and resize it: returns the (3, H, W) tensor and the original (H0, W0)."""
    image = read_rgb(path)
    return image_to_tensor(image, size), (image.shape[0], image.shape[1])


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def split_indices(
    count: int, val_fraction: float, seed: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Deterministic train / validation split of `count` items.

    A permutation drawn from `seed` puts `round(count * val_fraction)` items in validation;
    both index arrays are returned sorted. Training and evaluation call this with the same
    arguments, so the held-out items are the same in both.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(count)
    n_val = round(count * val_fraction)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


def _select_split(
    indices: tuple[NDArray[np.int64], NDArray[np.int64]], split: str
) -> NDArray[np.int64]:
    train, val = indices
    if split == "train":
        return train
    if split == "val":
        return val
    if split == "all":
        return np.sort(np.concatenate([train, val]))
    raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")


# --- Caltech-101 style class folders -------------------------------------------------------


class ClassFolderPairs(Dataset[Item]):
    """Random same-class image pairs from a folder of class folders (e.g. Caltech-101).

    Item: `source`, `target` (3, H, W) float tensors; `source_size`, `target_size` original
    (H0, W0) as int64 tensors; `label` (class index), `category`, `source_path`,
    `target_path`.

    Args:
        root: folder whose sub-folders are the classes.
        size: (H, W) of the returned tensors.
        classes: only these class names (default: every sub-folder with 2+ images).
        max_classes: keep the first `max_classes` classes (alphabetical) after `classes`.
        split: 'train', 'val' or 'all'. Within each class, `val_fraction` of the images are
            held out (`split_indices` with `seed`); pairs never mix the two splits.
        pairs_per_epoch: dataset length (default: the number of images in the split).
        balance_classes: draw the class uniformly (True) or in proportion to its images.
        seed: the pairs are a pure function of (seed, epoch, index): reproducible across
            runs and data-loader workers. `set_epoch` draws fresh pairs for a new epoch.
    """

    def __init__(
        self,
        root: str | Path,
        size: Size,
        *,
        classes: Sequence[str] | None = None,
        max_classes: int | None = None,
        split: str = "all",
        val_fraction: float = 0.1,
        pairs_per_epoch: int | None = None,
        balance_classes: bool = True,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.balance_classes = balance_classes
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        if classes is not None:
            wanted = set(classes)
            missing = wanted - {p.name for p in folders}
            if missing:
                raise ValueError(f"classes not found under {self.root}: {sorted(missing)}")
            folders = [p for p in folders if p.name in wanted]
        self.classes: list[str] = []
        self.images: list[list[Path]] = []
        for folder in folders:
            files = list_images(folder)
            chosen = _select_split(split_indices(len(files), val_fraction, seed), split)
            if len(chosen) >= 2:
                self.classes.append(folder.name)
                self.images.append([files[i] for i in chosen])
            if max_classes is not None and len(self.classes) >= max_classes:
                break
        if not self.classes:
            raise ValueError(f"no class folder with two or more images under {self.root}")
        counts = np.array([len(files) for files in self.images], np.float64)
        self._class_weights = counts / counts.sum()
        self.length = pairs_per_epoch if pairs_per_epoch is not None else int(counts.sum())

    def set_epoch(self, epoch: int) -> None:
        """Draw a different (still reproducible) set of pairs for this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def pair(self, index: int) -> tuple[int, Path, Path]:
        """The (class index, source path, target path) of pair `index` this epoch."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.balance_classes:
            label = int(rng.integers(len(self.classes)))
        else:
            label = int(rng.choice(len(self.classes), p=self._class_weights))
        first, second = rng.choice(len(self.images[label]), size=2, replace=False)
        return label, self.images[label][first], self.images[label][second]

    def __getitem__(self, index: int) -> Item:
        label, source_path, target_path = self.pair(index)
        source, source_size = load_image(source_path, self.size)
        target, target_size = load_image(target_path, self.size)
        return {
            "source": source,
            "target": target,
            "source_size": torch.tensor(source_size),
            "target_size": torch.tensor(target_size),
            "label": label,
            "category": self.classes[label],
            "source_path": str(source_path),
            "target_path": str(target_path),
        }


# --- MTFL faces ----------------------------------------------------------------------------

MTFL_ANNOTATIONS = "new_training.txt"
MTFL_POINTS = ("left eye", "right eye", "nose", "left mouth corner", "right mouth corner")
MTFL_MISALIGNED = ("net_7876/_*",)
"""Annotations that do not match their images in the MTFL copy we have: the 2,350
`net_7876` crops whose names start with `_` have the faces centred like the others, but
their points sit about 30 px too high (median eye y 3.5 px against 29.9 for the other
net_7876 crops and 36.3 for lfw_5590). The landmark evaluation leaves them out by default."""


@dataclass(frozen=True)
class FaceRecord:
    """One MTFL line: the image path relative to the root and its 5 points (5, 2) in pixels
    of the image file (x, y; left and right as seen in the image)."""

    path: str
    points: NDArray[np.float64]


def read_mtfl_annotations(path: str | Path) -> list[FaceRecord]:
    """Parse an MTFL annotation file: per line a relative path, then x1..x5, then y1..y5."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 11:
            raise ValueError(f"{path}:{number}: expected a path and 10 numbers, got {line!r}")
        values = np.array([float(v) for v in fields[1:]], np.float64)
        records.append(
            FaceRecord(fields[0].replace("\\", "/"), np.stack([values[:5], values[5:]], axis=1))
        )
    return records


def mtfl_split(
    root: str | Path, val_fraction: float = 0.1, seed: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The (train, val) line indices of `root/new_training.txt`: the one split that training
    (which must not see val) and the landmark evaluation both use."""
    count = len(read_mtfl_annotations(Path(root) / MTFL_ANNOTATIONS))
    return split_indices(count, val_fraction, seed)


class MTFLFaces(Dataset[Item]):
    """MTFL faces with their 5 annotated points.

    Item: `image` (3, H, W) float tensor; `points` (5, 2) float32 tensor in pixels of the
    resized image; `original_points` (5, 2) in pixels of the file; `original_size` (H0, W0);
    `index` (line number in the annotation file, from 0); `path`.

    Args:
        root: folder holding `new_training.txt` and the image folders it names.
        size: (H, W) of the returned image.
        split: 'train', 'val' or 'all', from `mtfl_split(root, val_fraction, seed)`.
        exclude: glob patterns (`fnmatch`) of relative image paths to leave out *after*
            splitting, so the split itself stays the one training uses. For annotations
            known not to match their images (see `MTFL_MISALIGNED`).
        limit: keep only `limit` items of the split, evenly spaced through it (quick runs).
    """

    def __init__(
        self,
        root: str | Path,
        size: Size,
        split: str = "train",
        val_fraction: float = 0.1,
        seed: int = 0,
        limit: int | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        self.root = Path(root)
        self.size = size
        records = read_mtfl_annotations(self.root / MTFL_ANNOTATIONS)
        indices = _select_split(split_indices(len(records), val_fraction, seed), split)
        kept = [not any(fnmatch.fnmatchcase(records[i].path, p) for p in exclude) for i in indices]
        self.indices = indices[np.asarray(kept, bool)]
        self.excluded = len(indices) - len(self.indices)
        if limit is not None and limit < len(self.indices):
            # Evenly spaced picks: the file lists its sources in blocks (lfw_5590, then
            # net_7876, framed differently), so the first `limit` would all come from one.
            picks = np.linspace(0, len(self.indices) - 1, limit).round().astype(np.int64)
            self.indices = self.indices[picks]
        self.records = [records[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Item:
        record = self.records[index]
        image, original_size = load_image(self.root / record.path, self.size)
        points = rescale_pixels(record.points, original_size, self.size)
        return {
            "image": image,
            "points": torch.from_numpy(points.astype(np.float32)),
            "original_points": torch.from_numpy(record.points.astype(np.float32)),
            "original_size": torch.tensor(original_size),
            "index": int(self.indices[index]),
            "path": record.path,
        }


TIGHT_SIZE = 80
TIGHT_INTER_OCULAR = 24.0
"""The tight-crop validation set: 80 x 80 crops with an inter-ocular distance of about 24 px,
the framing of the standard MTFL test set (AFLW faces), tighter than the training crops."""


def tight_crop_transform(
    points: NDArray[np.floating],
    rng: np.random.Generator,
    *,
    out_size: int = TIGHT_SIZE,
    inter_ocular: float = TIGHT_INTER_OCULAR,
    max_shift: float = 0.1,
    max_rotation_deg: float = 15.0,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The affine map of a tight face crop, placed from the 5 MTFL points (5, 2) only.

    The crop is centred halfway between the eyes' and the mouth corners' midpoints, scaled
    so that the eyes end up `inter_ocular` px apart in an `out_size` square, shifted by up
    to `max_shift` of the crop side in x and y and rotated by up to `max_rotation_deg`
    about its centre (uniform draws from `rng`). Returns (A (2, 2), b (2,)) with
    `input = A @ output + b` for pixel (x, y), pixel centres at integers."""
    pts = np.asarray(points, np.float64)
    eyes = (pts[0] + pts[1]) / 2
    mouth = (pts[3] + pts[4]) / 2
    centre = (eyes + mouth) / 2
    distance = float(np.linalg.norm(pts[0] - pts[1]))
    if not distance > 0:
        raise ValueError("coincident eye points: cannot scale the crop")
    scale = inter_ocular / distance  # output px per input px
    shift = rng.uniform(-max_shift, max_shift, 2) * out_size / scale  # in input px
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    a = rotation / scale
    middle = np.full(2, (out_size - 1) / 2)
    return a, centre + shift - a @ middle


def warp_affine(
    image: NDArray[np.uint8], a: NDArray[np.float64], b: NDArray[np.float64], out_size: Size
) -> NDArray[np.uint8]:
    """The (H, W) = `out_size` image whose pixel (x, y) shows `image` at `a @ (x, y) + b`
    (bilinear; black outside), pixel centres at integers."""
    height, width = out_size
    # Pillow's coordinates put pixel centres at +0.5.
    offset = b + 0.5 - a @ np.array([0.5, 0.5])
    coefficients = (a[0, 0], a[0, 1], offset[0], a[1, 0], a[1, 1], offset[1])
    warped = Image.fromarray(np.ascontiguousarray(image[..., :3])).transform(
        (width, height),
        Image.Transform.AFFINE,
        tuple(float(c) for c in coefficients),
        resample=Image.Resampling.BILINEAR,
    )
    return np.asarray(warped, np.uint8)


def affine_points(
    points: NDArray[np.floating], a: NDArray[np.float64], b: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Where input pixels (N, 2) land in the output of `warp_affine(image, a, b, ...)`."""
    return np.asarray((np.asarray(points, np.float64) - b) @ np.linalg.inv(a).T)


class MTFLTightFaces(MTFLFaces):
    """MTFL faces re-cropped tight (`tight_crop_transform`): the same faces and split as
    `MTFLFaces` with the same arguments, each face cropped to `TIGHT_SIZE` px with an
    inter-ocular distance of `TIGHT_INTER_OCULAR` px, a random shift and rotation drawn from
    (`crop_seed`, the face's line index), so every run crops the same way; then resized to
    `size`. Item as `MTFLFaces`, with `points` in pixels of the resized crop and
    `crop_points` in pixels of the 80 x 80 crop."""

    def __init__(
        self,
        root: str | Path,
        size: Size,
        split: str = "train",
        val_fraction: float = 0.1,
        seed: int = 0,
        limit: int | None = None,
        exclude: Sequence[str] = (),
        crop_seed: int = 0,
    ) -> None:
        super().__init__(root, size, split, val_fraction, seed, limit, exclude)
        self.crop_seed = crop_seed

    def __getitem__(self, index: int) -> Item:
        record = self.records[index]
        line = int(self.indices[index])
        rng = np.random.default_rng([self.crop_seed, line])
        a, b = tight_crop_transform(record.points, rng)
        crop = warp_affine(read_rgb(self.root / record.path), a, b, (TIGHT_SIZE, TIGHT_SIZE))
        crop_points = affine_points(record.points, a, b)
        points = rescale_pixels(crop_points, (TIGHT_SIZE, TIGHT_SIZE), self.size)
        return {
            "image": image_to_tensor(crop, self.size),
            "points": torch.from_numpy(points.astype(np.float32)),
            "crop_points": torch.from_numpy(crop_points.astype(np.float32)),
            "original_points": torch.from_numpy(record.points.astype(np.float32)),
            "original_size": torch.tensor((TIGHT_SIZE, TIGHT_SIZE)),
            "index": line,
            "path": record.path,
        }


# --- TSS -----------------------------------------------------------------------------------

TSS_FILES = ("image1.png", "image2.png", "flow1.flo", "flow2.flo", "mask1.png", "mask2.png")


class TSSPairs(Dataset[Item]):
    """TSS pairs (Taniai et al. 2016): every folder under `root` holding `flow1.flo`.

    Item (original resolution, numpy): `name` (folder relative to root), `image1`,
    `image2` uint8 (H, W, 3); `flow1` (H1, W1, 2) float32, image 1 -> 2 in pixels, and
    `flow2` (2 -> 1), unknown flow left as stored (see `jlad_client.flowio.valid_flow_mask`);
    `mask1`, `mask2` (H, W) bool foregrounds; `flip` (bool, from `flip_gt.txt`: the pair is
    mirrored, and methods that cannot match across a mirror flip image 1 first).
    With `size` = (H, W) it also holds `source`, `target` (3, H, W) tensors of the images.
    """

    def __init__(self, root: str | Path, size: Size | None = None) -> None:
        self.root = Path(root)
        self.size = size
        self.pairs = sorted(p.parent for p in self.root.rglob("flow1.flo"))
        if not self.pairs:
            raise ValueError(f"no TSS pair (a folder with flow1.flo) under {self.root}")
        for folder in self.pairs:
            missing = [f for f in TSS_FILES if not (folder / f).is_file()]
            if missing:
                raise ValueError(f"{folder}: missing {missing}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Item:
        folder = self.pairs[index]
        flip_file = folder / "flip_gt.txt"
        flip = flip_file.is_file() and flip_file.read_text().split()[:1] == ["1"]
        item: Item = {
            "name": folder.relative_to(self.root).as_posix() or folder.name,
            "image1": read_rgb(folder / "image1.png"),
            "image2": read_rgb(folder / "image2.png"),
            "flow1": read_flo(folder / "flow1.flo"),
            "flow2": read_flo(folder / "flow2.flo"),
            "mask1": read_mask(folder / "mask1.png"),
            "mask2": read_mask(folder / "mask2.png"),
            "flip": flip,
        }
        if item["flow1"].shape[:2] != item["image1"].shape[:2]:
            raise ValueError(f"{folder}: flow1 does not match image1")
        if self.size is not None:
            item["source"] = image_to_tensor(item["image1"], self.size)
            item["target"] = image_to_tensor(item["image2"], self.size)
        return item


# --- PF-WILLOW -----------------------------------------------------------------------------


def read_pf_keypoints(path: str | Path) -> NDArray[np.float64]:
    """Keypoints (N, 2) pixel (x, y) from a PF-WILLOW `.mat` (`pts_coord`: 2 x N, x row then
    y row). Kept as annotated (a possible one-pixel MATLAB origin shift is the same in both
    images of a pair and immaterial at PCK@0.1)."""
    coords = np.asarray(scipy.io.loadmat(str(path))["pts_coord"], np.float64)
    if coords.ndim != 2 or coords.shape[0] != 2:
        raise ValueError(f"{path}: pts_coord must be 2 x N, got {coords.shape}")
    return np.ascontiguousarray(coords.T)


class PFWillow(Dataset[Item]):
    """PF-WILLOW-format keypoint pairs: all ordered pairs (i != j) of images within a class.

    `root` is a folder of class folders, or one class folder; a class folder holds
    `NAME.png` with `NAME.mat` (see `read_pf_keypoints`). Item: `category`, `source_name`,
    `target_name`, `source_image`, `target_image` uint8 (H, W, 3), `source_points`,
    `target_points` (N, 2) float64 pixel (x, y) in the original images; with `size` =
    (H, W) also `source`, `target` (3, H, W) tensors.
    """

    def __init__(self, root: str | Path, size: Size | None = None) -> None:
        self.root = Path(root)
        self.size = size
        folders = (
            [self.root]
            if any(self.root.glob("*.mat"))
            else sorted(p for p in self.root.iterdir() if p.is_dir() and any(p.glob("*.mat")))
        )
        self.classes: list[str] = []
        self.images: list[list[Path]] = []
        for folder in folders:
            images = sorted(p for p in folder.glob("*.png") if p.with_suffix(".mat").is_file())
            if len(images) >= 2:
                self.classes.append(folder.name)
                self.images.append(images)
        if not self.classes:
            raise ValueError(f"no PF-WILLOW class (2+ NAME.png with NAME.mat) under {self.root}")
        self.pairs = [
            (c, i, j)
            for c, images in enumerate(self.images)
            for i in range(len(images))
            for j in range(len(images))
            if i != j
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Item:
        label, i, j = self.pairs[index]
        source_path, target_path = self.images[label][i], self.images[label][j]
        item: Item = {
            "category": self.classes[label],
            "label": label,
            "source_name": source_path.stem,
            "target_name": target_path.stem,
            "source_image": read_rgb(source_path),
            "target_image": read_rgb(target_path),
            "source_points": read_pf_keypoints(source_path.with_suffix(".mat")),
            "target_points": read_pf_keypoints(target_path.with_suffix(".mat")),
        }
        if item["source_points"].shape != item["target_points"].shape:
            raise ValueError(f"{source_path.stem} and {target_path.stem}: keypoint counts differ")
        if self.size is not None:
            item["source"] = image_to_tensor(item["source_image"], self.size)
            item["target"] = image_to_tensor(item["target_image"], self.size)
        return item
