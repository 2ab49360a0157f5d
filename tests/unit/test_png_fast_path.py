"""Plain 8-bit PNGs are decoded by libspng (pyspng) instead of PIL: the same pixels, every
other PNG left to PIL, and a corrupt one still refused with PIL's reason."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kiln.handlers import images
from kiln.handlers.errors import BadInput

pytest.importorskip("pyspng")

RNG = np.random.default_rng(7)


def png(img: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG", **save)
    return out.getvalue()


def pil_unit(raw: bytes, channels: int, monkeypatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(images, "pyspng", None)
        return images.unit_image_from_bytes(raw, channels)


def turned_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    return exif


def with_chunk(raw: bytes, kind: bytes, data: bytes) -> bytes:
    """raw with a chunk inserted right after IHDR (8 + 25 bytes)."""
    chunk = struct.pack(">I", len(data)) + kind + data
    chunk += struct.pack(">I", zlib.crc32(kind + data))
    return raw[:33] + chunk + raw[33:]


@pytest.mark.parametrize("size", [(1, 1), (28, 28), (17, 5), (64, 300)])
@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_grey_and_rgb_are_the_pixels_pil_gives(size, level, monkeypatch):
    grey = RNG.integers(0, 256, size[::-1], dtype=np.uint8)
    rgb = RNG.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    for pixels, channels in ((grey, 1), (rgb, 3)):
        raw = png(Image.fromarray(pixels), compress_level=level)
        fast = images.plain_png_pixels(raw, channels)
        assert fast is not None
        np.testing.assert_array_equal(fast, pixels)
        unit = images.unit_image_from_bytes(raw, channels)
        np.testing.assert_array_equal(unit, pil_unit(raw, channels, monkeypatch))


def test_smooth_images_use_every_filter_the_same(monkeypatch):
    """Gradients make PIL's encoder pick Sub, Up, Average and Paeth filters."""
    y, x = np.mgrid[0:40, 0:40]
    pixels = ((x * 3 + y * 5 + (x * y) % 7) % 256).astype(np.uint8)
    raw = png(Image.fromarray(pixels), optimize=True)
    np.testing.assert_array_equal(images.plain_png_pixels(raw, 1), pixels)
    np.testing.assert_array_equal(images.unit_image_from_bytes(raw, 1),
                                  pil_unit(raw, 1, monkeypatch))


def test_pngs_pil_converts_are_left_to_pil(monkeypatch):
    grey = RNG.integers(0, 256, (12, 9), dtype=np.uint8)
    rgb = RNG.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    cases = {
        "rgb as grey": (png(Image.fromarray(rgb)), 1),
        "grey as rgb": (png(Image.fromarray(grey)), 3),
        "rgba": (png(Image.fromarray(np.dstack([rgb, grey]))), 3),
        "palette": (png(Image.fromarray(rgb).convert("P")), 3),
        "16-bit grey": (png(Image.fromarray(grey.astype(np.uint16) * 257)), 1),
        "1-bit": (png(Image.fromarray(grey > 128)), 1),
        "grey with tRNS": (with_chunk(png(Image.fromarray(grey)), b"tRNS", b"\x00\x00"), 1),
        "grey, EXIF turned": (png(Image.fromarray(grey), exif=turned_exif()), 1),
    }
    for name, (raw, channels) in cases.items():
        assert images.plain_png_pixels(raw, channels) is None, name
        np.testing.assert_array_equal(images.unit_image_from_bytes(raw, channels),
                                      pil_unit(raw, channels, monkeypatch), err_msg=name)
    # The EXIF orientation was applied: 12x9 stored, 9x12 decoded.
    assert images.unit_image_from_bytes(cases["grey, EXIF turned"][0], 1).shape == (9, 12)


def test_a_corrupt_plain_png_is_refused_as_before(monkeypatch):
    raw = bytearray(png(Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8))))
    idat = raw.index(b"IDAT")
    raw[idat + 10:idat + 30] = bytes(20)
    raw = bytes(raw)
    assert images.plain_png_pixels(raw, 1) is None
    for decoder in (images.unit_image_from_bytes, lambda r, c: pil_unit(r, c, monkeypatch)):
        with pytest.raises(BadInput, match="PNG image could not be decoded"):
            decoder(raw, 1)
    truncated = raw[:idat]
    assert images.plain_png_pixels(truncated, 1) is None
    with pytest.raises(BadInput, match="could not be decoded"):
        images.unit_image_from_bytes(truncated, 1)


def test_without_pyspng_pil_decodes_everything(monkeypatch):
    pixels = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
    raw = png(Image.fromarray(pixels))
    monkeypatch.setattr(images, "pyspng", None)
    assert images.plain_png_pixels(raw, 1) is None
    np.testing.assert_array_equal(images.unit_image_from_bytes(raw, 1),
                                  pixels / 255.0)
