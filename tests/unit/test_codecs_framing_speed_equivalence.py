"""The image decode path, tuned for speed, against a plain float64 reference of it.

The reference below is the straightforward version of unit_image_from_bytes (grey) ->
frame_like_mnist -> standardise_image (np.pad, np.indices, ImageOps.exif_transpose,
float64 throughout); the model inputs must match it exactly, not merely closely.
"""

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from kiln.handlers import images, rest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "digits"


# --- reference -------------------------------------------------------------------------


def reference_grey(raw):
    fmt = "PNG" if raw.startswith(images.PNG_MAGIC) else "JPEG"
    with Image.open(io.BytesIO(raw), formats=(fmt,)) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            return np.clip(np.asarray(img, dtype=np.float64) / 65535.0, 0.0, 1.0)
        if "A" in img.getbands() or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
        return np.asarray(img.convert("L"), dtype=np.float64) / 255.0


def reference_resize(grey, height, width):
    height, width = max(1, height), max(1, width)
    if grey.shape == (height, width):
        return grey.copy()
    img = Image.fromarray(grey.astype(np.float32))
    out = np.asarray(img.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float64)
    return np.clip(out, 0.0, 1.0)


def reference_frame(grey, height, width):
    ring = np.concatenate([grey[0, :], grey[-1, :], grey[1:-1, 0], grey[1:-1, -1]])
    if ring.mean() > 0.5:
        grey = 1.0 - grey
    ink = grey > images.INK_THRESHOLD
    if not ink.any():
        return reference_resize(grey, height, width)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = min(images.FRAME_SIDE, height, width) / max(crop.shape)
    digit = reference_resize(crop, math.floor(crop.shape[0] * scale + 0.5),
                             math.floor(crop.shape[1] * scale + 0.5))
    centre = ((digit.shape[0] - 1) / 2, (digit.shape[1] - 1) / 2)
    if digit.sum() > 0:
        r, c = np.indices(digit.shape)
        centre = ((r * digit).sum() / digit.sum(), (c * digit).sum() / digit.sum())
    top = math.floor((height - 1) / 2 - centre[0] + 0.5)
    left = math.floor((width - 1) / 2 - centre[1] + 0.5)
    canvas = np.zeros((height + 2 * digit.shape[0], width + 2 * digit.shape[1]))
    canvas[top + digit.shape[0] : top + 2 * digit.shape[0],
           left + digit.shape[1] : left + 2 * digit.shape[1]] = digit  # fmt: skip
    return canvas[digit.shape[0] : digit.shape[0] + height, digit.shape[1] : digit.shape[1] + width]


def reference_model_input(raw, signature):
    spec = signature["inputs"][0]
    grey = reference_frame(reference_grey(raw), *spec["size"])
    padded = np.pad(grey, spec["pad"], mode="constant", constant_values=0.0)
    x = (padded - spec["mean"][0]) / spec["std"][0]
    return x.reshape(spec["shape"][1:]).astype(np.float32)


# --- bodies ----------------------------------------------------------------------------


def encode(img, fmt="PNG", **options):
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def strokes(rng, height, width):
    """A light scribble of a few thick random strokes on a dark ground."""
    img = np.zeros((height, width), dtype=np.float64)
    for _ in range(rng.integers(1, 4)):
        r0, c0, r1, c1 = rng.uniform(0.1, 0.9, 4) * [height, width, height, width]
        for t in np.linspace(0, 1, 4 * max(height, width)):
            r, c = int(r0 + t * (r1 - r0)), int(c0 + t * (c1 - c0))
            img[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = rng.uniform(0.6, 1.0)
    return (img * 255).astype(np.uint8)


def bodies():
    rng = np.random.default_rng(7)
    out = {path.name: path.read_bytes() for path in sorted(FIXTURES.iterdir())}
    for i in range(60):
        levels = strokes(rng, 28, 28) if i < 40 else strokes(rng, *rng.integers(8, 90, 2))
        out[f"scribble{i}"] = encode(Image.fromarray(levels))
        out[f"scribble{i}-inverted"] = encode(Image.fromarray(255 - levels))
        if i % 4 == 0:
            out[f"scribble{i}-jpeg"] = encode(Image.fromarray(255 - levels), "JPEG")
            noise = rng.integers(0, 256, (*levels.shape, 4), dtype=np.uint8)
            out[f"noise{i}-rgba"] = encode(Image.fromarray(noise, "RGBA"))
            out[f"noise{i}-16bit"] = encode(Image.fromarray(noise[..., 0].astype(np.uint16) * 257))
            out[f"scribble{i}-palette"] = encode(Image.fromarray(levels).convert("P"))
    canvas = np.zeros((60, 60, 4), dtype=np.uint8)
    canvas[10:30, 20:40] = (0, 0, 0, 255)
    out["transparent-canvas"] = encode(Image.fromarray(canvas, "RGBA"))
    out["black"] = encode(Image.new("L", (50, 50), 0))
    out["white-28"] = encode(Image.new("L", (28, 28), 255))
    page = np.full((700, 1300, 3), 235, dtype=np.uint8)
    page[80:600, 400:520] = 20
    out["large-page-jpeg"] = encode(Image.fromarray(page), "JPEG", quality=90)
    half = np.zeros((40, 40), dtype=np.uint8)  # the border mean is exactly 0.5
    half[:20] = 255
    half[10:30, 15:25] = 128
    out["half-border"] = encode(Image.fromarray(half))
    tilted = np.full((60, 40), 255, dtype=np.uint8)
    tilted[5:20, 5:35] = tilted[5:55, 5:10] = 0
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out[f"exif-{orientation}-jpeg"] = encode(Image.fromarray(tilted), "JPEG",
                                                 exif=exif.tobytes())
        out[f"exif-{orientation}-png"] = encode(Image.fromarray(tilted), exif=exif.tobytes())
    return out


BODIES = bodies()


@pytest.mark.parametrize("name", list(BODIES))
def test_model_input_matches_the_float64_reference_exactly(name, image_signature):
    raw = BODIES[name]
    got = rest.decode_request(raw, image_signature)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, reference_model_input(raw, image_signature))
    np.testing.assert_array_equal(images.unit_image_from_bytes(raw, 1), reference_grey(raw))


def test_exif_orientation_still_turns_the_image():
    upright, turned = (images.unit_image_from_bytes(BODIES[f"exif-{o}-png"], 1) for o in (1, 6))
    assert upright.shape == (60, 40) and turned.shape == (40, 60)
    np.testing.assert_array_equal(turned, np.rot90(upright, -1))


def test_batch_standardising_matches_pad_then_standardise(image_signature):
    spec = image_signature["inputs"][0]
    for grey in (np.random.default_rng(1).random((5, 28, 28)),
                 np.random.default_rng(2).random((3, 28, 28)).astype(np.float32)):
        padded = np.pad(grey, [(0, 0), (2, 2), (2, 2)])
        expected = ((padded - spec["mean"][0]) / spec["std"][0]).reshape(-1, 1, 32, 32).astype(
            np.float32)
        np.testing.assert_array_equal(images.standardise_image(grey, spec),
                                      expected)


def test_resize_of_a_non_contiguous_view_matches_a_copy():
    grey = np.random.default_rng(3).random((30, 17))
    np.testing.assert_array_equal(images.resize(grey.T, 9, 20),
                                  reference_resize(np.ascontiguousarray(grey.T), 9, 20))
