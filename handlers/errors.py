"""Why a request is not answered: BadInput with a fixed reason, and the messages' wording."""

import json

# Why a request is rejected, as a fixed set: metrics are labelled by it, and the message
# (which quotes the request) would make a new label value for every bad request.
REJECT_REASONS = ("empty_body", "bad_form", "not_image_or_json", "undecodable", "too_large",
                  "wrong_type", "bad_shape", "bad_features", "bad_value", "non_finite_output",
                  "batch_full", "busy", "other")
# A request over a size bound (handlers/limits.py) is 413; a legal request that does not fit
# in what its server-side batch has left, or in its worker's share of time for large images,
# is 503 with Retry-After (sent again, it rides in another batch); every other bad request
# 400. The status follows the reason, so that "instance 3: ..." keeps both.
STATUS_OF_REASON = {"too_large": 413, "batch_full": 503, "busy": 503}
RETRY_AFTER_S = 1
MAX_LISTED_NAMES = 5
# A message quotes the request only as an excerpt: an error body stays small whatever was
# sent (a 600 KB body of unknown names once got a 300 KB answer).
MAX_MESSAGE_CHARS = 500
MAX_NAME_CHARS = 40


class BadInput(ValueError):
    """A request that cannot be scored; str(error) is the message the client sees (at most
    MAX_MESSAGE_CHARS), `reason` one of REJECT_REASONS."""

    def __init__(self, message, reason="other"):
        super().__init__(cut(message, MAX_MESSAGE_CHARS))
        self.reason = reason

    @property
    def status(self):
        return STATUS_OF_REASON.get(self.reason, 400)


def cut(text, limit):
    """text, or its first limit - 3 characters and "..."."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_body(message, code=400):
    """The JSON body for a request that is not answered."""
    return {"error": message, "code": code}


def json_type(value):
    """What a JSON value is, in words: "a string", "an array", "null"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def describe(value, limit=40):
    """A value as JSON text, cut to `limit` characters. Only that much is encoded: the value
    may be a megabyte of arrays, or nested hundreds of levels deep."""
    try:
        chunks = json.JSONEncoder().iterencode(value)  # lazy: the C encoder is one-shot
        text = "".join(_until(chunks, limit + 1))
    except (TypeError, ValueError, RecursionError):
        text = repr(value)[:limit + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _until(chunks, length):
    """Chunks of text until they hold `length` characters together."""
    total = 0
    for chunk in chunks:
        yield chunk
        total += len(chunk)
        if total >= length:
            return


def quoted(names):
    """'a', 'b' and 3 more."""
    shown = ", ".join(f"'{cut(str(name), MAX_NAME_CHARS)}'" for name in names[:MAX_LISTED_NAMES])
    extra = len(names) - MAX_LISTED_NAMES
    return shown + (f" and {extra} more" if extra > 0 else "")
