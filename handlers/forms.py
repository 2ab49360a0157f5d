"""Form bodies (multipart/form-data and application/x-www-form-urlencoded), decoded here.

TorchServe's own form decoder answers a malformed form with a 500 before any worker sees it,
so Kiln's front proxy (deploy/front.py) hands form bodies over as plain bytes, their content
type in FORM_TYPE_HEADER, and this module turns them into the fields TorchServe would have
given: {field name: bytes or text}. Bounded before any work: at most MAX_FIELDS fields.
"""

from __future__ import annotations

import re
import urllib.parse
from email.message import Message

from kiln.handlers.errors import BadInput

FORM_TYPE_HEADER = "kiln-form-type"  # the front proxy (deploy/front.py) sets it
MAX_FIELDS = 16  # a model takes one field per input; more is a client's mistake
# RFC 2046: 1 to 70 characters, of these (a space not last).
BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def decode_form(body: bytes, content_type: str) -> dict[str, bytes | str]:
    """The fields of a form body sent with `content_type`; BadInput naming what is wrong."""
    header = _header("content-type", content_type)
    media = header.get_content_type()
    if media == "application/x-www-form-urlencoded":
        if body.lstrip()[:1] in (b"{", b"["):
            # JSON sent with curl -d's default content type: the body is what was meant.
            return {"body": body}
        return _urlencoded(body)
    if media == "multipart/form-data":
        boundary = header.get_param("boundary", header="content-type")
        if not isinstance(boundary, str) or not BOUNDARY.fullmatch(boundary):
            raise BadInput("multipart/form-data needs a boundary of 1 to 70 letters, digits "
                           "or '()+_,-./:=? in its Content-Type", reason="bad_form")
        return _multipart(body, boundary.encode("ascii"))
    raise BadInput(f"not a form content type: {media}", reason="bad_form")


def _header(name: str, value: str) -> Message:
    header = Message()
    header[name] = value
    return header


def _urlencoded(body: bytes) -> dict[str, bytes | str]:
    try:
        pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True,
                                       strict_parsing=True, max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        raise BadInput("a urlencoded form holds only ASCII: percent-encode the rest",
                       reason="bad_form") from None
    except ValueError as err:
        if "max_num_fields" in str(err) or "Max number of fields" in str(err):
            raise BadInput(f"a form of more than {MAX_FIELDS} fields", reason="bad_form") \
                from None
        raise BadInput("not a urlencoded form: expected name=value pairs joined by &",
                       reason="bad_form") from None
    return _fields(pairs)


def _multipart(body: bytes, boundary: bytes) -> dict[str, bytes | str]:
    delimiter = b"\r\n--" + boundary
    # Counted before splitting: the work is bounded by the field bound, not by the body.
    if body.count(delimiter) + body.startswith(delimiter[2:]) > MAX_FIELDS + 1:
        raise BadInput(f"a form of more than {MAX_FIELDS} fields", reason="bad_form")
    chunks = (b"\r\n" + body).split(delimiter)
    if len(chunks) < 2:
        raise BadInput("a multipart body without its boundary", reason="bad_form")
    pairs = []
    for chunk in chunks[1:]:  # chunks[0] is the preamble, ignored as RFC 2046 says
        if chunk.startswith(b"--"):
            return _fields(pairs)
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"\r\n"):
            raise BadInput("a multipart part without its headers and blank line",
                           reason="bad_form")
        pairs.append((_field_name(head[2:]), content))
    raise BadInput("a multipart body that ends before its closing boundary", reason="bad_form")


def _field_name(head: bytes) -> str:
    disposition = None
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            disposition = value.decode("utf-8", "replace").strip()
    if disposition is None:
        raise BadInput("a multipart part without Content-Disposition", reason="bad_form")
    name = _header("content-disposition", disposition).get_param(
        "name", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise BadInput("a multipart part without a field name", reason="bad_form")
    return name


def _fields(pairs) -> dict[str, bytes | str]:
    fields: dict[str, bytes | str] = {}
    for name, value in pairs:
        if name in fields:
            raise BadInput(f"the form field {name[:40]!r} is given twice", reason="bad_form")
        fields[name] = value
    return fields
