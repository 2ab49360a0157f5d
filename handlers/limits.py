"""How much work one request, and one server-side batch, may cost the handler: every bound in
one place, each with its reason, each checked from sizes, headers and shapes before anything
is decoded.

A request over a bound gets 413 (too much of something) or 400 (a shape or format no model
takes) with a short message naming the bound and the number. TorchServe hands several
requests to one handle() call (a server-side batch); the batch has bounds of its own, and
requests are admitted in order: one that would take the batch past a bound gets its own 503
and the others are answered. A worker gives requests of large images a share of its time
(DecodeShare): past it, such a request gets a 503 and is sent again. Costs quoted below were
measured on one core of the development machine (the report of issue 11 has the figures).
"""

import math
from dataclasses import dataclass, field
from time import monotonic

import numpy as np

from kiln.handlers.errors import BadInput

# --- JSON text, before json.loads -------------------------------------------------------------
# The deepest body Kiln takes is about 8 levels ({"instances": [[[[...]]]]}, an OIP tensor's
# nested data); json.loads recurses once per level, and a value 900 levels deep would pass it
# and then cost every walk over it.
MAX_JSON_DEPTH = 32
# json.loads makes a Python object per array or object, ~0.4 us each: 4 MiB of "[0]," is a
# million of them and took 0.4 s to parse. 512 digits as pixel arrays need 14,849.
MAX_JSON_CONTAINERS = 65_536
# Python's own bound for integers (sys.int_info.default_max_str_digits), for every number:
# json.loads parses a float of 100,000 digits too, in time linear in its length, and no value
# Kiln takes needs more than 17 significant digits.
MAX_NUMBER_CHARS = 4300

# --- one request --------------------------------------------------------------------------
# Rows scored for one request; past this many, a client should send a batch job.
MAX_INSTANCES = 512
# Each encoded image costs ~0.12 ms beside its pixels (header, decoder set-up, resize):
# 512 digit PNGs take ~60 ms.
MAX_IMAGES = 512
# One image, from its header: a 30 kB PNG can declare a gigapixel image, and decoding it
# would take the worker's memory. A flat 4096x4096 PNG (15 KiB) takes ~0.27 s to decode and
# frame, a noisy one ~0.85 s.
MAX_SIDE = 4096
MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
# An image costs per row and per column too, not only per pixel: libspng and PIL unfilter
# each row (27-31 ns a row), and the resize computes Lanczos weights for every line of the
# side it shrinks and, for an image narrower than the model's input, widens each row first
# (160-166 ns a row or a column, whatever the policy); a pixel costs 15 ns in all (5 to
# decode, 10 to frame). A 1 x 16,777,216 PNG (33 kB) within the pixel bound took 6 s, 12
# times the square, and 512 images of 1 x 32,768 in one request would take 3 s. So each image
# is charged its pixels plus ROW_PIXELS a row and COLUMN_PIXELS a column (measured by
# loadtests/studies/thin_images.py), and bounded by what the 4096x4096 square is charged: the
# thinnest image admitted is 1 x 1,205,393 (0.25 s), the widest 1,406,292 x 1.
ROW_PIXELS = 13
COLUMN_PIXELS = 11
MAX_IMAGE_COST = MAX_IMAGE_PIXELS + (ROW_PIXELS + COLUMN_PIXELS) * MAX_SIDE
# All the images of one request together, each charged as above (image_cost), summed from
# their headers: 205 images each under the limit above once kept a worker busy for 30 s.
MAX_REQUEST_PIXELS = MAX_IMAGE_COST
# One {"b64": ...} image's text, measured with len() before base64 decodes it: what the
# default 4 MiB body can carry, so that the bound holds when the body limit is raised.
MAX_B64_CHARS = 4 * 1024 * 1024
# An OIP request's "id" is echoed in its answer.
MAX_ID_CHARS = 256
# Values of the model's input for one request (rows x values per row, a variable length
# padded to the request's longest): as many float32 values as 4 MiB hold. 512 digits are
# 524,288 for lenet; 512 x 30 features 15,360.
MAX_REQUEST_VALUES = 1 << 20

# --- one server-side batch ------------------------------------------------------------------
# Images are decoded one after another in the worker: two requests' worth at most (~0.5 s
# of flat PNGs, ~1.7 s of noisy ones).
MAX_BATCH_PIXELS = 2 * MAX_REQUEST_PIXELS
# The model's input for one batch, variable lengths padded to the batch's longest: 16 MiB
# of float32. Eight requests of 512 digits each fit (lenet: exactly 4,194,304).
MAX_BATCH_VALUES = 1 << 22

# --- one worker, over time ------------------------------------------------------------------
# The bounds above keep one request to a 4096x4096 square's decoding and a batch to two, but
# not a worker's time: 8 clients sending the costliest image admitted kept lenet's worker
# decoding, and a digit queued behind them waited 0.8 s (p50) to 1.7 s, or got a 503 (issue
# 16). So a worker gives requests whose images cost more than CHEAP_REQUEST_PIXELS at most
# COSTLY_SHARE of its time (DecodeShare), counted in the seconds their decoding really took,
# not in pixels: a square takes 0.25 s on an idle core but 0.35-0.71 s (median) on the 2
# cores shared with other work, and a budget of one square's pixels a second let a square
# into nearly every batch (a digit waited up to 1.6 s, one over 2 s). A request past the
# share gets a 503 from its headers, in microseconds, so the queue drains, and a digit waits
# behind one decode at most: under the same flood, p99 0.47-0.60 s, max 0.67-1.26 s
# (loadtests/studies/thin_images.py). 512 digits, the most a request holds, cost 745,472: ordinary
# requests are never counted.
CHEAP_REQUEST_PIXELS = 1 << 20
COSTLY_SHARE = 0.5
# What an idle worker saves up: a few mid-size images in a row pass, and the costly requests
# of one batch take at most twice this beside the last one admitted (a square from an idle
# worker leaves it owing 0.025 s; the next waits until that is earned back).
COSTLY_CREDIT_S = 0.1


def too_large(message):
    """A request over a size bound: 413."""
    return BadInput(message, reason="too_large")


def image_cost(width, height):
    """What decoding and framing an image of this shape costs, in pixels (see ROW_PIXELS)."""
    return width * height + ROW_PIXELS * height + COLUMN_PIXELS * width


def check_image_shape(width, height):
    """Refuses, from its header, an image of too many pixels, or too thin a shape for what it
    would cost."""
    if width * height > MAX_IMAGE_PIXELS:
        raise too_large(f"image is {width}x{height} pixels, more than the limit of "
                        f"{MAX_IMAGE_PIXELS} pixels")
    cost = image_cost(width, height)
    if cost > MAX_IMAGE_COST:
        raise too_large(f"image is {width}x{height} pixels, too thin: its rows and columns "
                        f"cost as much to decode and resize as {cost} pixels, more than the "
                        f"limit of {MAX_IMAGE_COST} (a {MAX_SIDE}x{MAX_SIDE} image's)")


# --- JSON text ------------------------------------------------------------------------------

_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(_BRACKETS)))
_DEPTH_STEP = np.zeros(256, np.int8)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1
# Characters of a JSON number become "0", all others " ": a run of zeros is a number (or a
# run of digits inside a string, which no request Kiln takes needs either).
_NUMBER_MASK = bytes(0x30 if chr(i) in "-+.0123456789eE" else 0x20 for i in range(256))
_LONG_NUMBER = b"0" * (MAX_NUMBER_CHARS + 1)


def check_json_text(text):
    """Refuses JSON text nested too deeply, with too many arrays and objects, or with too long
    a number, by counting bytes (about 1 ms per MiB): json.loads never sees it.

    Brackets and digits inside strings count too, which keeps the count to two passes of
    bytes.translate: a string would need 33 unclosed "[" (or 4,301 digits in a row) to be
    taken for nesting (or a number), and no request Kiln takes holds such a string."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    brackets = raw.translate(None, _NOT_BRACKETS)
    # Well-formed JSON has one closer per opener: the depth is known from this many brackets.
    head = brackets[: 2 * MAX_JSON_CONTAINERS]
    if len(head) > MAX_JSON_DEPTH:
        depth = int(np.cumsum(_DEPTH_STEP.take(np.frombuffer(head, np.uint8)),
                              dtype=np.int64).max())
        if depth > MAX_JSON_DEPTH:
            raise BadInput(f"JSON nested {depth} levels deep, more than the limit of "
                           f"{MAX_JSON_DEPTH}", reason="undecodable")
    opened = brackets.count(b"[") + brackets.count(b"{")
    if opened > MAX_JSON_CONTAINERS:
        raise too_large(f"JSON body has {opened} arrays and objects, more than the limit of "
                        f"{MAX_JSON_CONTAINERS}: send images as PNG or arrays as .npy")
    if _LONG_NUMBER in raw.translate(_NUMBER_MASK):
        raise BadInput(f"body is not valid JSON: a number has more than {MAX_NUMBER_CHARS} "
                       "digits", reason="undecodable")


# --- what a request costs ---------------------------------------------------------------------


def check_instances(count):
    if count > MAX_INSTANCES:
        raise too_large(f"{count} instances in one request, more than {MAX_INSTANCES}")


def check_images(count):
    """Before any image header is read."""
    if count > MAX_IMAGES:
        raise too_large(f"{count} images in one request, more than the limit of {MAX_IMAGES}")


def check_b64(text):
    if isinstance(text, str) and len(text) > MAX_B64_CHARS:
        raise too_large(f'"b64" image of {len(text)} characters, more than the limit of '
                        f"{MAX_B64_CHARS}")


def row_values(spec, length=1):
    """Values of one row of the input `spec` for the model, a variable length set to `length`."""
    return math.prod(length if d == -1 else d for d in spec["shape"][1:])


def clamp_length(length, spec):
    """A claimed variable length within [1, max_length]: a longer row is refused by its shape
    check (400), and a request should not get a 413 for what is a shape error."""
    return min(max(1, length), spec.get("max_length", 1))


@dataclass
class Cost:
    """What one request asks of the handler, known before decoding: its rows, the longest
    variable length per input (1 where fixed), its encoded images and their pixels (each
    image charged for its rows and columns too: image_cost)."""

    rows: int
    lengths: list = field(default_factory=list)
    images: int = 0
    pixels: int = 0

    def values(self, specs):
        lengths = self.lengths or [1] * len(specs)
        return self.rows * sum(row_values(s, n) for s, n in zip(specs, lengths, strict=True))


class Budget:
    """What one server-side batch has admitted so far. admit() refuses a request that would
    take it past a bound, and leaves it as it was; restore() takes back a request that was
    admitted but then failed to decode. `share`, the worker's DecodeShare, is asked last, so
    that a request refused by the batch's bounds never counts against the worker's."""

    def __init__(self, specs, share=None):
        self.specs, self.share = specs, share
        self.rows, self.pixels = 0, 0
        self.lengths = [1] * len(specs)

    def admit(self, cost):
        check_request(cost, self.specs)
        rows = self.rows + cost.rows
        lengths = [max(a, b) for a, b in zip(self.lengths, cost.lengths or self.lengths,
                                             strict=True)]
        values = Cost(rows, lengths).values(self.specs)
        if values > MAX_BATCH_VALUES:
            raise BadInput(f"this server-side batch would hold {values} input values with this "
                           f"request, more than the limit of {MAX_BATCH_VALUES} per batch: "
                           "send it again, or with fewer rows", reason="batch_full")
        if self.pixels + cost.pixels > MAX_BATCH_PIXELS:
            raise BadInput(f"this server-side batch would decode {self.pixels + cost.pixels} "
                           f"pixels with this request, more than the limit of "
                           f"{MAX_BATCH_PIXELS} per batch: send it again", reason="batch_full")
        if self.share is not None:
            self.share.admit(cost.pixels)
        self.rows, self.lengths, self.pixels = rows, lengths, self.pixels + cost.pixels

    def state(self):
        return self.rows, list(self.lengths), self.pixels

    def restore(self, state):
        self.rows, self.lengths, self.pixels = state[0], list(state[1]), state[2]


class DecodeShare:
    """The seconds one worker may still give costly requests: COSTLY_SHARE of each second is
    added (while idle, up to COSTLY_CREDIT_S), and each costly request's decoding is taken
    off once done. `clock`: seconds (time.monotonic)."""

    def __init__(self, clock=None):
        self.clock = clock or monotonic
        self.held, self.at = COSTLY_CREDIT_S, self.clock()
        self.started = None  # when the costly request admitted last began

    def _refill(self, most=COSTLY_CREDIT_S):
        now = self.clock()
        self.held = min(most, self.held + (now - self.at) * COSTLY_SHARE)
        self.at = now
        return now

    def admit(self, pixels):
        """Refuses (503) a request over CHEAP_REQUEST_PIXELS while the worker is in debt; a
        cheaper one passes uncounted."""
        if pixels <= CHEAP_REQUEST_PIXELS:
            return
        now = self._refill()
        if self.held <= 0:
            raise BadInput(f"this request's images cost {pixels} pixels, and this worker has "
                           "given its share of time to such large images: send it again",
                           reason="busy")
        self.started = now

    def settle(self):
        """After a request is decoded, or failed to be: a costly one's time is taken off."""
        if self.started is not None:  # what it earned while decoding is kept
            now = self._refill(most=math.inf)
            self.held -= now - self.started
            self.started = None


def check_request(cost, specs):
    """The bounds of one request (instances, images and pixels are also checked earlier, as
    they are counted)."""
    check_instances(cost.rows)
    check_images(cost.images)
    values = cost.values(specs)
    if values > MAX_REQUEST_VALUES:
        raise too_large(f"{values} input values in one request, more than the limit of "
                        f"{MAX_REQUEST_VALUES}: send fewer rows")


def admit(cost, specs, budget=None):
    """Checks a request's cost against its own bounds and, inside a server-side batch, the
    batch's (`budget`)."""
    (budget or Budget(specs)).admit(cost)


# --- the Open Inference Protocol ------------------------------------------------------------


def infer_cost(request, specs):
    """The cost of an OIP infer request, from its tensors' declared shapes (data unread). A
    tensor this cannot read counts nothing: decoding it refuses it with its own 400."""
    request_id = request.get("id")
    if isinstance(request_id, str) and len(request_id) > MAX_ID_CHARS:
        raise too_large(f'"id" of {len(request_id)} characters, more than the limit of '
                        f"{MAX_ID_CHARS}")
    tensors = request.get("inputs")
    by_name = {spec["name"]: i for i, spec in enumerate(specs)}
    rows, lengths = 0, [1] * len(specs)
    for tensor in tensors if isinstance(tensors, list) else []:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            continue
        shape, index = tensor.get("shape"), by_name.get(tensor["name"])
        if index is None or not isinstance(shape, list) or not shape or not all(
                type(d) is int and d >= 0 for d in shape[:8]):
            continue
        rows = max(rows, shape[0])
        check_instances(rows)  # before a row of data is read
        spec = specs[index]
        dims = spec["shape"][1:]
        axis = dims.index(-1) if -1 in dims else None
        if axis is not None and len(shape) > axis + 1 and type(shape[axis + 1]) is int:
            lengths[index] = clamp_length(shape[axis + 1], spec)
    return Cost(rows, lengths)
