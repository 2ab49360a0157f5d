"""What an image's shape costs, beside its pixel count:
`python -m kiln.loadtests.studies.thin_images`.

A PNG of 1 x 16,777,216 pixels is within the pixel bound and compresses to 33 kB, but its
decoder works per row and its resize per row and per column: it cost 12 times a square
4096 x 4096. This study times, in-process on one core, each stage of an image request
(decoding by libspng and by PIL; framing by each resize policy) on thin and square blank
images, and prints its cost per row, per column and per pixel: the figures behind
handlers/limits.py's image cost bound.

thin_part() is the reliability benchmark's part: the time to answer or refuse the costliest
legal images of any shape, and good requests of the image model while clients send one of
them in a loop.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from kiln import client as http
from kiln.handlers import images, limits
from kiln.loadtests.studies.reliability.amplification import Bounds, timed
from kiln.loadtests.studies.reliability.load import Mix
from kiln.loadtests.studies.reliability.served import rest_payload
from kiln.loadtests.studies.reliability.slow import good_requests
from kiln.loadtests.studies.reliability.table import Row, codes

# The thin side's length in the study: long enough that per-line costs dwarf fixed ones.
LINES = 1 << 20
SQUARE = 2048
POLICIES = ("mnist", "fit", "crop")


def blank_png(width: int, height: int, mode: str = "L") -> bytes:
    """A black PNG: the least bytes for its shape (1 x 16,777,216 is 33 kB)."""
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return out.getvalue()


def seconds(fn, repeat: int) -> float:
    """The least of `repeat` timings: the stage's own cost, with the least noise from the
    other processes on the machine."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_unit(timer, repeat: int) -> tuple[float, float, float]:
    """ns per row, per column and per pixel of a stage, `timer(width, height)` its seconds:
    each a difference of two sizes, so the fixed costs cancel; a line's pixels are taken off
    its cost."""
    pixel = (timer(SQUARE, SQUARE) - timer(SQUARE // 2, SQUARE // 2)) / (0.75 * SQUARE ** 2)
    row = (timer(1, LINES) - timer(1, LINES // 4)) / (0.75 * LINES) - pixel
    column = (timer(LINES, 1) - timer(LINES // 4, 1)) / (0.75 * LINES) - pixel
    return row * 1e9, column * 1e9, pixel * 1e9


def decode_timer(mode: str, channels: int, repeat: int):
    def timer(width, height):
        raw = blank_png(width, height, mode)
        return seconds(lambda: images.unit_image_from_bytes(raw, channels), repeat)
    return timer


def frame_timer(policy: str, repeat: int):
    spec = {"channels": 1, "size": [28, 28], "resize": policy}

    def timer(width, height):
        unit = np.zeros((height, width))
        return seconds(lambda: images.fit_to_size(unit, spec), repeat)
    return timer


def study(repeat: int) -> list[tuple[str, tuple[float, float, float]]]:
    stages = [("decode: libspng, grey PNG", decode_timer("L", 1, repeat)),
              ("decode: PIL, RGB PNG to grey", decode_timer("RGB", 1, repeat))]
    stages += [(f"frame: {policy}, to 28x28", frame_timer(policy, repeat))
               for policy in POLICIES]
    return [(name, per_unit(timer, repeat)) for name, timer in stages]


# --- the reliability benchmark's part ------------------------------------------------------
def longest_line(along: int, across: int) -> int:
    """The most lines of a one-pixel-wide image the handlers admit, charged `along` pixels a
    line of that length and `across` for the one line across (rows, then columns, or the other
    way round); the pixel bound alone where they charge nothing per line."""
    cost = getattr(limits, "MAX_IMAGE_COST", limits.MAX_IMAGE_PIXELS)
    return min(limits.MAX_IMAGE_PIXELS, (cost - across) // (1 + along))


def thin_cases() -> dict[str, tuple[int, int]]:
    """label -> (width, height): the square at the pixel bound, the thinnest and the widest
    image admitted, and the issue's 1 x 16,777,216."""
    row, column = getattr(limits, "ROW_PIXELS", 0), getattr(limits, "COLUMN_PIXELS", 0)
    side = int(limits.MAX_IMAGE_PIXELS ** 0.5)
    return {"square at pixel bound": (side, side),
            "thinnest admitted": (1, longest_line(row, column)),
            "widest admitted": (longest_line(column, row), 1), "1 x 16,777,216": (1, 16_777_216)}


def thin_part(server, models, opts) -> list[Row]:
    """Each case's median time to be answered or refused beside the square's; then good
    requests of the image model, alone and while opts.clients connections send the square,
    the thinnest image admitted, then the issue's, in a loop."""
    name = models.image[0]
    client = http.Client(server.url("inference"), server.keys()["inference"], timeout=300)
    bodies = {label: blank_png(*size) for label, size in thin_cases().items()}
    rows, rest_per_s = [], Bounds.served(server).rest_per_s
    for label, body in bodies.items():
        ms, statuses = timed(client, name, body, "image/png", opts.repeat, rest_per_s)
        rows.append(Row(f"thin {name}: {label}", ms, "ms", rows[0].value if rows else None,
                        f"{'x'.join(map(str, thin_cases()[label]))}, {len(body) / 1024:.0f} "
                        f"kB, {codes(statuses)}"))
    return rows + flood_rows(server, name, {label: bodies[label] for label in FLOODS}, opts)


# The images the flood rows send: the costliest admitted square and thin shape, and the
# issue's, refused from its header.
FLOODS = ("square at pixel bound", "thinnest admitted", "1 x 16,777,216")


def flood_rows(server, name: str, bodies: dict[str, bytes], opts) -> list[Row]:
    token, path = server.keys()["inference"], f"/predictions/{name}"
    good = rest_payload(name)
    base = good_requests(server.url("inference"), path, good, token, 1, opts.cell_seconds)
    rows = [Row(f"thin flood: good {name} p50, no flood", base.percentile(50), "ms",
                detail=f"{len(base.ms)} answered, {sum(base.failed.values())} failed")]
    for label, body in bodies.items():
        flood = Mix(server.url("inference"), [(path, body, "image/png")], token, opts.clients,
                    opts.cell_seconds)
        got = good_requests(server.url("inference"), path, good, token, 1, opts.cell_seconds)
        load = flood.finish()
        detail = f"{opts.clients} clients sending it: {codes(load.statuses)}"
        rows += good_rows(f"thin flood {label}", got, base, detail)
        sent = sum(load.statuses.values())
        rows.append(Row(f"thin flood {label}: 503 share", 100 * load.statuses[503] / sent
                        if sent else None, "%", detail=f"of {sent} sent"))
    return rows


def good_rows(prefix: str, got, base, detail: str) -> list[Row]:
    """p50, p99 and max of the good requests answered beside `base`'s, and those that were
    not; the max is "-" (None) only when none was answered, which `failed` then counts."""
    sent = len(got.ms) + sum(got.failed.values())
    return [Row(f"{prefix}: good p50", got.percentile(50), "ms", base.percentile(50), detail),
            Row(f"{prefix}: good p99", got.percentile(99), "ms", base.percentile(99)),
            Row(f"{prefix}: good max", max(got.ms, default=None), "ms",
                max(base.ms, default=None)),
            Row(f"{prefix}: good failed", sum(got.failed.values()), "req",
                sum(base.failed.values()), f"of {sent}; {codes(got.failed)}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3,
                        help="timings of each stage and size, the least counts (default: 3)")
    args = parser.parse_args(argv)
    print(f"{'stage':<32}{'ns/row':>10}{'ns/column':>11}{'ns/pixel':>10}{'row/pixel':>11}")
    for name, (row, column, pixel) in study(args.repeat):
        print(f"{name:<32}{row:>10.1f}{column:>11.1f}{pixel:>10.2f}{row / pixel:>11.1f}")
    print(f"bound: a row costs {limits.ROW_PIXELS} pixels, a column {limits.COLUMN_PIXELS}; "
          f"an image at most {limits.MAX_IMAGE_COST:,} (a {limits.MAX_SIDE}^2 square)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
