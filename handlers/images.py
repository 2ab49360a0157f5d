"""Image inputs: PNG/JPEG bytes or raw pixel arrays as standardised model rows.

Grey (1 channel) or RGB (3 channels); resized by the input's policy (mnist, fit, crop,
exact); padded, standardised per channel and shaped as the input's shape. Pure numpy and PIL.
"""

import functools
import io
import logging
import math
import struct

import numpy as np
from PIL import ExifTags, Image, ImageOps

from kiln.handlers import arrays
from kiln.handlers.errors import BadInput, json_type
from kiln.handlers.limits import (
    MAX_IMAGE_PIXELS,
    MAX_REQUEST_PIXELS,
    check_image_shape,
    image_cost,
)

try:
    import pyspng
except ImportError:  # no wheel for this platform: PIL decodes every image
    pyspng = None

logger = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# After inversion, a pixel brighter than this is ink when framing a digit.
INK_THRESHOLD = 0.1
# MNIST scales each digit's longer side to 20 pixels inside its 28x28 canvas.
FRAME_SIDE = 20
# Lanczos keeps thin strokes sharp when a photo is scaled down by a large factor.
RESAMPLE = Image.Resampling.LANCZOS
# Each 8-bit level in [0, 1], exactly as level / 255.0 gives it: a lookup is cheaper.
_UNIT_LEVELS = np.arange(256, dtype=np.float64) / 255.0
_UNIT_LEVELS.flags.writeable = False
_16_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# PNG colour types (IHDR byte 25) that need no conversion for 1 and 3 channels: grey, RGB.
_PLAIN_COLOUR_TYPE = {1: 0, 3: 2}
# Chunks after which PIL's pixels differ from the stored ones: transparency is composited
# on paper (_on_paper), EXIF orientation turns the image (_upright).
_PIL_ONLY_CHUNKS = (b"tRNS", b"eXIf")


def is_encoded_image(raw):
    return raw.startswith(PNG_MAGIC) or raw.startswith(JPEG_MAGIC)


# --- requests -> rows ------------------------------------------------------------------


def image_row_from_bytes(raw, spec):
    """PNG/JPEG bytes as one model row of the input `spec`."""
    return standardise_image(framed_unit_from_bytes(raw, spec), spec)


def framed_unit_from_bytes(raw, spec):
    """PNG/JPEG bytes decoded to [0, 1] and brought to the input's size, not yet
    standardised (standardise_image takes a stack of them at once)."""
    return fit_to_size(unit_image_from_bytes(raw, spec["channels"]), spec)


def image_row_from_json(value, spec):
    """A JSON pixel array ([H, W], [H, W, C] or {"pixels": ...}) as one model row."""
    pixels = pixels_from_json(value, spec)
    return standardise_image(pixels / spec["pixel_max"], spec)


def image_rows_from_raw(values, spec):
    """Raw pixels [N, H, W] or [N, H, W, C] (float64, shape checked by the caller) as model
    rows, checked and standardised without per-row Python."""
    arrays.check_finite(values, "pixel")
    check_pixel_range(values, spec["pixel_max"])
    return standardise_image(values / spec["pixel_max"], spec)


# --- decoding --------------------------------------------------------------------------


def unit_image_from_bytes(raw, channels):
    """PNG/JPEG bytes as float64 in [0, 1]: [H, W] grey or [H, W, 3] RGB."""
    plain = plain_png_pixels(raw, channels)
    if plain is not None:
        return _UNIT_LEVELS.take(plain)
    fmt = "PNG" if raw.startswith(PNG_MAGIC) else "JPEG"
    try:
        img = Image.open(io.BytesIO(raw), formats=(fmt,))
    except Image.DecompressionBombError:
        raise _bomb() from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        logger.debug("unreadable %s header: %s", fmt, err)
        raise _undecodable(fmt) from None
    with img:
        check_image_shape(*img.size)
        try:
            img.load()
            upright = _upright(img)
            return _grey_unit(upright) if channels == 1 else _rgb_unit(upright)
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            logger.debug("undecodable %s: %s", fmt, err)
            raise _undecodable(fmt) from None


def plain_png_pixels(raw, channels):
    """The stored pixels of an 8-bit grey (channels 1) or RGB (channels 3) PNG with no
    transparency and no EXIF, decoded by libspng: exactly the pixels PIL gives such an image
    (lossless, no conversion), in a quarter of the time. None for any other image, or one
    libspng cannot decode: PIL then decodes it, or says what is wrong with it."""
    size = _png_size(raw) if pyspng is not None and raw.startswith(PNG_MAGIC) else None
    if size is None:
        return None
    check_image_shape(*size)  # a batch job decodes with no request admitted before
    if raw[24] != 8 or raw[25] != _PLAIN_COLOUR_TYPE.get(channels):
        return None
    at = 8
    while at + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[at:at + 8])
        if kind in _PIL_ONLY_CHUNKS:
            return None
        if kind == b"IEND":
            break
        at += 12 + length
    try:
        pixels = pyspng.load(raw)
    except Exception:  # noqa: BLE001 - libspng's errors are RuntimeErrors; PIL tells why
        return None
    width, height = size
    expected = (height, width) if channels == 1 else (height, width, 3)
    return pixels if pixels.shape == expected and pixels.dtype == np.uint8 else None


def _png_size(raw):
    """(width, height) from a PNG's leading IHDR chunk, or None where it is not plainly there:
    reading 8 bytes costs a tenth of opening the image with PIL, for every PNG request."""
    if raw[8:16] != b"\x00\x00\x00\x0dIHDR" or len(raw) < 33:
        return None
    width, height = struct.unpack(">II", raw[16:24])
    return (width, height) if 0 < width * height <= MAX_IMAGE_PIXELS else None


def declared_pixels(raw):
    """What an encoded image costs by its header's width and height (no pixel decoded), in
    pixels: limits.image_cost. 0 when the header cannot be read (decoding it will say why).
    An image over MAX_IMAGE_PIXELS, or too thin for its cost, is refused."""
    fmt = "PNG" if raw.startswith(PNG_MAGIC) else "JPEG"
    size = _png_size(raw) if fmt == "PNG" else None
    if size is not None:  # anything unusual goes through PIL, which says what it is
        check_image_shape(*size)
        return image_cost(*size)
    try:
        with Image.open(io.BytesIO(raw), formats=(fmt,)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise _bomb() from None
    except (OSError, SyntaxError, ValueError, EOFError):
        return 0
    check_image_shape(width, height)
    return image_cost(width, height)


def _bomb():
    # PIL refuses such a header itself, before we can read the size from it.
    return BadInput(f"image is larger than the limit of {MAX_IMAGE_PIXELS} pixels",
                    reason="too_large")


def check_request_pixels(raws):
    """The pixels a request's images declare together, from their headers alone; refused
    (before any is decoded) when more than MAX_REQUEST_PIXELS."""
    total = 0
    for raw in raws:
        total += declared_pixels(raw)
        if total > MAX_REQUEST_PIXELS:
            raise BadInput(f"the request's images declare more than {MAX_REQUEST_PIXELS} pixels "
                           "together, rows and columns counted (the limit per request): send "
                           "fewer or smaller images",
                           reason="too_large")
    return total


def _undecodable(fmt):
    return BadInput(f"{fmt} image could not be decoded (truncated or corrupt)",
                    reason="undecodable")


def _upright(img):
    """ImageOps.exif_transpose(img), without its copy of the many images that carry no
    orientation (or orientation 1, upright already)."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


def _on_paper(img):
    """A canvas drawing is usually dark strokes on a transparent ground: treat it as paper."""
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img


def _grey_unit(img):
    if img.mode in _16_BIT_MODES:
        # 16-bit greys: convert("L") would clip rather than scale.
        return np.clip(np.asarray(img, dtype=np.float64) / 65535.0, 0.0, 1.0)
    img = _on_paper(img)
    if img.mode != "L":
        img = img.convert("L")
    return _UNIT_LEVELS.take(np.asarray(img))


def _rgb_unit(img):
    if img.mode in _16_BIT_MODES:
        return np.repeat(_grey_unit(img)[..., np.newaxis], 3, axis=2)
    img = _on_paper(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return _UNIT_LEVELS.take(np.asarray(img))


# --- sizing ----------------------------------------------------------------------------


def fit_to_size(unit, spec):
    """A decoded [0, 1] image brought to the input's size by its resize policy."""
    height, width = spec["size"]
    policy = spec["resize"]
    if policy == "mnist":
        return frame_like_mnist(unit, spec["size"])
    if policy == "exact":
        if unit.shape[:2] != (height, width):
            raise BadInput(f"image is {unit.shape[1]}x{unit.shape[0]} pixels; this model takes "
                           f"exactly {width}x{height}", reason="bad_shape")
        return unit
    if policy == "fit":
        return resize_planes(unit, height, width)
    return crop_to_size(unit, height, width)


def crop_to_size(unit, height, width):
    """Scales the shorter side to fit and cuts the centre, in one resize of the part of the
    image the cut keeps (PIL's box: the same Lanczos weights, neighbours outside the box
    included): scaling the whole image first made a 1 x 1,000,000 image 28 x 28,000,000
    before the cut (3 GB of float32)."""
    rows, cols = unit.shape[:2]
    scale = max(height / rows, width / cols)
    scaled_rows = max(height, _round_half_up(rows * scale))
    scaled_cols = max(width, _round_half_up(cols * scale))
    top, left = (scaled_rows - height) // 2, (scaled_cols - width) // 2
    if (scaled_rows, scaled_cols) == (rows, cols):  # a cut, no resize
        return unit[top:top + height, left:left + width].copy()
    down, across = rows / scaled_rows, cols / scaled_cols
    box = (left * across, top * down, (left + width) * across, (top + height) * down)
    return resize_planes(unit, height, width, box)


def resize_planes(unit, height, width, box=None):
    """resize() of a grey [H, W] image, or of each plane of an [H, W, C] image."""
    if unit.ndim == 2:
        return resize(unit, height, width, box)
    return np.stack([resize(unit[..., c], height, width, box) for c in range(unit.shape[2])],
                    axis=2)


def border_mean(grey):
    """Mean of the outermost ring of pixels."""
    ring = np.concatenate([grey[0, :], grey[-1, :], grey[1:-1, 0], grey[1:-1, -1]])
    # For float64, ring.mean() to the last bit, without its overhead.
    return float(ring.sum()) / ring.size


def frame_like_mnist(grey, image_size):
    """Inverts a dark-on-light image, then crops, scales and centres its ink as MNIST does."""
    if border_mean(grey) > 0.5:
        grey = 1.0 - grey
    height, width = image_size
    ink = grey > INK_THRESHOLD
    ink_rows = ink.any(axis=1)
    if not ink_rows.any():
        return resize(grey, height, width)
    (row0, row1), (col0, col1) = _span(ink_rows), _span(ink.any(axis=0))
    crop = grey[row0:row1, col0:col1]
    side = min(FRAME_SIDE, height, width)
    scale = side / max(crop.shape)
    digit = resize(
        crop, _round_half_up(crop.shape[0] * scale), _round_half_up(crop.shape[1] * scale)
    )
    centre_row, centre_col = centre_of_mass(digit)
    canvas = np.zeros((height, width), dtype=np.float64)
    top = _round_half_up((height - 1) / 2 - centre_row)
    left = _round_half_up((width - 1) / 2 - centre_col)
    paste_clipped(canvas, digit, top, left)
    return canvas


def _span(mask):
    """(first, last + 1) of the True entries of a 1-D mask that has some."""
    return int(mask.argmax()), len(mask) - int(mask[::-1].argmax())


def resize(grey, height, width, box=None):
    """Resamples a [0, 1] image (or the part of it in `box`: left, top, right, bottom);
    clipped because Lanczos rings past the input range."""
    height, width = max(1, height), max(1, width)
    if box is None and grey.shape == (height, width):
        return grey.copy()
    # The image shares the float32 array's memory: no copy on the way into PIL.
    pixels = np.ascontiguousarray(grey, dtype=np.float32)
    img = Image.frombuffer("F", pixels.shape[::-1], pixels, "raw", "F", 0, 1)
    out = np.asarray(img.resize((width, height), RESAMPLE, box), dtype=np.float64)
    return out.clip(0.0, 1.0)


def centre_of_mass(grey):
    """(row, column) of the intensity-weighted centre; the geometric centre if all dark."""
    total = grey.sum()
    if total <= 0:
        return (grey.shape[0] - 1) / 2, (grey.shape[1] - 1) / 2
    rows, cols = _index_grids(grey.shape)
    return float((rows * grey).sum() / total), float((cols * grey).sum() / total)


@functools.lru_cache(maxsize=256)
def _index_grids(shape):
    """np.indices(shape) as float64 (exact, and cheaper to multiply with a float64 image),
    read-only: digits come in a few dozen shapes, so each is made once."""
    grids = np.indices(shape, dtype=np.float64)
    grids.flags.writeable = False
    return grids


def paste_clipped(canvas, patch, top, left):
    """Writes patch into canvas at (top, left), dropping whatever falls outside."""
    r0, c0 = max(top, 0), max(left, 0)
    r1 = min(top + patch.shape[0], canvas.shape[0])
    c1 = min(left + patch.shape[1], canvas.shape[1])
    if r0 < r1 and c0 < c1:
        canvas[r0:r1, c0:c1] = patch[r0 - top : r1 - top, c0 - left : c1 - left]


def _round_half_up(x):
    # Python's round() goes to even: 4.5 -> 4 but 5.5 -> 6 would shift digits unevenly.
    return int(math.floor(x + 0.5))


# --- raw pixels ------------------------------------------------------------------------


def pixel_shape(spec):
    """[H, W] for a grey input, [H, W, C] for a colour one."""
    channels = spec["channels"]
    return [*spec["size"]] + ([channels] if channels > 1 else [])


def pixels_from_json(value, spec):
    """A JSON pixel array ([H, W] grey, [H, W, C] colour, bare or as {"pixels": ...}) as
    float64 raw pixels, checked against [0, pixel_max].

    [1, H, W] is not taken as one image: three levels of lists are a list of images."""
    if isinstance(value, dict) and list(value) == ["pixels"]:
        value = value["pixels"]
    if not isinstance(value, list):
        raise BadInput(
            'expected a PNG or JPEG image, a pixel array or {"pixels": [...]}, '
            f"got {json_type(value)}", reason="wrong_type"
        )
    expected = pixel_shape(spec)
    shape = arrays.leading_shape(value)
    if shape != expected:
        shown = f"shape {shape}" if len(shape) <= 4 else f"{len(shape)} dimensions"
        raise BadInput(f"pixel array has {shown}, expected [{', '.join(map(str, expected))}]",
                       reason="bad_shape")
    pixels = arrays.numbers_array(value, shape, "pixel")
    check_pixel_range(pixels, spec["pixel_max"])
    return pixels


def check_pixel_range(pixels, pixel_max):
    """Rejects the first pixel outside [0, pixel_max]."""
    bad = arrays.first_true((pixels < 0) | (pixels > pixel_max))
    if bad is not None:
        at = list(bad)
        raise BadInput(f"pixel at {at} is {pixels[tuple(at)]:g}, outside [0, {pixel_max:g}]",
                       reason="bad_value")


# --- standardising ---------------------------------------------------------------------


def standardise_image(unit, spec):
    """Pads [0, 1] images (one, or a batch [N, ...]; grey [H, W] or colour [H, W, C]) with
    background, standardises each channel and shapes them for the model."""
    many = unit.ndim == (3 if spec["channels"] == 1 else 4)
    planes = unit[..., np.newaxis, :, :] if spec["channels"] == 1 else np.moveaxis(unit, -1, -3)
    p = spec.get("pad", 0)
    # In the image's own float dtype, as Python floats would be: float32 stays float32.
    dtype = planes.dtype if planes.dtype.kind == "f" else np.float64
    mean = np.asarray(spec["mean"], dtype=dtype).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=dtype).reshape(-1, 1, 1)
    height, width = planes.shape[-2:]
    x = np.empty((*planes.shape[:-2], height + 2 * p, width + 2 * p), dtype=np.float32)
    # The pad is background (0 in the image's dtype), standardised like the pixels.
    x[...] = (planes.dtype.type(0) - mean) / std
    x[..., p : p + height, p : p + width] = (planes - mean) / std
    shape = spec["shape"][1:]
    return x.reshape([-1, *shape] if many else shape)
