"""Part 3: the costliest requests the handlers accept, and refuse."""

from __future__ import annotations

import io
import json
import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import requests
from PIL import Image, ImageDraw

from kiln import client as http
from kiln import declaration
from kiln.deploy.server import Server
from kiln.handlers import images, inputs
from kiln.loadtests.studies.reliability.served import (
    Models,
    rest_payload,
)
from kiln.loadtests.studies.reliability.table import Row, codes

log = logging.getLogger("kiln.reliability")

MB = 1024 * 1024


@dataclass(frozen=True)
class Bounds:
    instances: int
    request_pixels: int
    image_pixels: int
    body_bytes: int
    # What the handlers charge an image per row and per column, beside its pixels.
    row_pixels: int = 0
    column_pixels: int = 0
    # Seconds to wait a second of costly decoding back (limits.DecodeShare).
    rest_per_s: float = 0

    @classmethod
    def served(cls, server: Server) -> Bounds:
        """The handlers' per-request bounds (from handlers/limits.py where it defines them),
        and the frontend's body bound."""
        try:
            from kiln.handlers import limits
        except ImportError:
            limits = None
        return cls(getattr(limits, "MAX_INSTANCES", inputs.MAX_INSTANCES),
                   getattr(limits, "MAX_REQUEST_PIXELS", images.MAX_REQUEST_PIXELS),
                   getattr(limits, "MAX_IMAGE_PIXELS", images.MAX_IMAGE_PIXELS),
                   server.settings.max_request_size, getattr(limits, "ROW_PIXELS", 0),
                   getattr(limits, "COLUMN_PIXELS", 0),
                   1 / getattr(limits, "COSTLY_SHARE", math.inf))


def ring_png(width: int, height: int, channels: int) -> bytes:
    """A thick dark ring on white, edge to edge: the MNIST framing crops and scales all of it
    (the costliest case), and it compresses to a small body."""
    img = Image.new("L" if channels == 1 else "RGB", (width, height), "white")
    ImageDraw.Draw(img).ellipse((0, 0, width - 1, height - 1), outline="black",
                                width=max(1, min(width, height) // 8))
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def image_requests(spec: dict, b: Bounds) -> dict[str, tuple[bytes, str, str]]:
    """label -> (body, content type, what it is) for the costliest image requests, and the
    one just over the request pixel bound."""
    n = b.instances
    side = math.isqrt(min(b.request_pixels // n, b.image_pixels))
    row, column = b.row_pixels, b.column_pixels
    while n * (side * side + (row + column) * side) > b.request_pixels:
        side -= 1
    one = math.isqrt(min(b.request_pixels, b.image_pixels))
    tile = ring_png(side, side, spec["channels"])
    # rows that cross the bound
    extra = (b.request_pixels - n * (side * side + (row + column) * side)) // (side + row) + 1
    over = [tile] * (n - 1) + [ring_png(side, side + extra, spec["channels"])]
    rng = np.random.default_rng(0)
    shape = tuple(images.pixel_shape(spec))
    arrays = rng.integers(0, int(spec["pixel_max"]) + 1, size=(n, *shape)).tolist()
    return {
        "most PNGs at pixel bound": (*http.encode_images([tile] * n),
                                     f"{n} x {side}x{side} = {n * side * side:,} px"),
        "one PNG at pixel bound": (ring_png(one, one, spec["channels"]), "image/png",
                                   f"{one}x{one} = {one * one:,} px"),
        "most JSON pixel arrays": (*http.encode_json({"instances": arrays}),
                                   f"{n} x {'x'.join(map(str, shape))}"),
        "pixels over bound, refused": (*http.encode_images(over),
                                       f"{n * side * side + extra * side:,} px "
                                       f"(bound {b.request_pixels:,})"),
    }


def feature_requests(example, b: Bounds) -> dict[str, tuple[bytes, str, str]]:
    return {"most rows": (*http.encode_json([example] * b.instances), f"{b.instances} rows"),
            "rows over bound, refused": (*http.encode_json([example] * (b.instances + 1)),
                                         f"{b.instances + 1} rows (bound {b.instances})")}


def timed(client: http.Client, name: str, body: bytes, content_type: str,
          repeat: int, rest_per_s: float = 0) -> tuple[float, Counter]:
    """Median ms of `repeat` calls, and their statuses (0: the connection was closed), each
    followed by a pause `rest_per_s` times as long as it took: a worker gives costly images a
    share of its time (Bounds.rest_per_s), and each call, here or in the next case, is to be
    timed, not refused for the one before it."""
    times, statuses = [], Counter()
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            statuses[client.predict(name, body, content_type).status] += 1
        except requests.RequestException:
            statuses[0] += 1
            client.session = requests.Session()
        times.append((time.perf_counter() - start) * 1000)
        time.sleep(times[-1] / 1000 * rest_per_s)
    return statistics.median(times), statuses


def amplification_part(server: Server, models: Models, opts) -> list[Row]:
    bounds = Bounds.served(server)
    client = http.Client(server.url("inference"), server.keys()["inference"], timeout=300)
    image, features = models.image[0], models.features[0]
    minimal_image, minimal_rows = rest_payload(image), rest_payload(features)
    cases = {image: image_requests(declaration.get(image).inputs[0], bounds),
             features: feature_requests(json.loads(minimal_rows.body), bounds)}
    padding = bounds.body_bytes + 1 - len(minimal_image.body)
    cases[image]["body over size bound, refused"] = (
        minimal_image.body + b" " * padding, minimal_image.content_type,
        f"{bounds.body_bytes + 1:,} bytes (bound {bounds.body_bytes:,})")
    rows = []
    for name, minimal in ((image, minimal_image), (features, minimal_rows)):
        log.info("amplification: %s, %d call(s) of each request", name, opts.repeat)
        least, statuses = timed(client, name, minimal.body, minimal.content_type, opts.repeat)
        rows.append(Row(f"amp {name}: minimal", least, "ms",
                        detail=f"{len(minimal.body):,} bytes, {codes(statuses)}"))
        rest_per_s = bounds.rest_per_s if name == image else 0
        for label, (body, content_type, what) in cases[name].items():
            ms, statuses = timed(client, name, body, content_type, opts.repeat, rest_per_s)
            rows.append(Row(f"amp {name}: {label}", ms, "ms", least,
                            f"{what}, {len(body) / MB:.2f} MB, {codes(statuses)}"))
    return rows
