"""The split is fixed, stratified, disjoint, and the same on every run."""

import numpy as np
import pytest
import torch

from kiln.training import data


@pytest.mark.parametrize("name,sizes", [("mnist", (3500, 500, 1000)),
                                        ("breast_cancer", (398, 57, 114))])
def test_split_sizes_are_fixed_and_disjoint(name, sizes):
    x, y, _, _ = data.load_raw(name)
    train, val, test = data.split_indices(y)
    assert (len(train), len(val), len(test)) == sizes
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert len(set(train) | set(val) | set(test)) == len(y)
    again = data.split_indices(y)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=False))


def test_mnist_test_split_is_stratified():
    ds = data.load("mnist")
    assert np.bincount(ds.test.y).tolist() == [100] * 10
    assert ds.train.x.shape == (3500, 28, 28) and ds.train.x.dtype == np.uint8


def test_breast_cancer_labels_and_names():
    ds = data.load("breast_cancer")
    assert ds.labels == ["malignant", "benign"]
    assert len(ds.feature_names) == 30 and ds.feature_names[0] == "mean radius"


def test_image_tensor_pads_and_standardises_exactly():
    x = np.zeros((1, 28, 28), dtype=np.uint8)
    x[0, 0, 0] = 255
    t = data.image_tensor(x, pad=2, mean=0.5, std=0.25)
    assert t.shape == (1, 1, 32, 32)
    assert t[0, 0, 2, 2].item() == pytest.approx(2.0)  # (1 - 0.5) / 0.25
    assert t[0, 0, 0, 0].item() == pytest.approx(-2.0)  # padding is background


def test_random_affine_keeps_shape_and_background():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((4, 1, 28, 28), -0.4)
    out = data.random_affine(x, gen, background=-0.4)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-5)  # a blank image stays blank, edges included
