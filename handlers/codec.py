"""The old codec's names still used by loadtests/ (single-input models only), until those
scripts call rest, signature and answers directly; nothing in Kiln's serving core imports it."""

from kiln.handlers import rest
from kiln.handlers.errors import BadInput  # noqa: F401
from kiln.handlers.rest import decode_request  # noqa: F401
from kiln.handlers.signature import load_signature  # noqa: F401


def decode_instances(body, signature):
    """(rows, many) of a single-input model's body: rest.decode_body's first input."""
    model_inputs, many = rest.decode_body(body, signature)
    return model_inputs[0], many
