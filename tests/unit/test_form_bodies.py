"""Form bodies, decoded by Kiln's handler (the front proxy keeps them from TorchServe's decoder)."""

import pytest
import requests

from kiln.handlers.errors import BadInput
from kiln.handlers.forms import MAX_FIELDS, decode_form

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\r\n--x\r\n"  # CRLFs and a boundary-like run inside a file


def multipart(files):
    request = requests.Request("POST", "http://x/", files=files).prepare()
    return request.body, request.headers["Content-Type"]


def test_multipart_fields_come_back_byte_for_byte():
    body, ctype = multipart({"data": ("d.png", PNG, "image/png"), "note": (None, "hi")})
    assert decode_form(body, ctype) == {"data": PNG, "note": b"hi"}


def test_urlencoded_fields_are_decoded():
    assert decode_form(b"data=abc&x=%41+b", "application/x-www-form-urlencoded") == {
        "data": "abc", "x": "A b"}


def test_json_sent_with_curls_default_content_type_is_the_body():
    body = b' {"instances": [[1, 2]]}'
    assert decode_form(body, "application/x-www-form-urlencoded") == {"body": body}


@pytest.mark.parametrize("body, ctype, message", [
    (b"--xx\r\ngarbage", "multipart/form-data; boundary=xx", "without its headers"),
    (b"abc", "multipart/form-data", "needs a boundary"),
    (b"abc", "multipart/form-data; boundary=\"a\x01b\"", "needs a boundary"),
    (b"--a\r\n" * (MAX_FIELDS + 5), "multipart/form-data; boundary=a", "more than 16 fields"),
    (b"&".join(b"a%d=1" % i for i in range(MAX_FIELDS + 1)),
     "application/x-www-form-urlencoded", "more than 16 fields"),
    (b"\xff\xfe=1", "application/x-www-form-urlencoded", "only ASCII"),
    (b"a=1&&&b", "application/x-www-form-urlencoded", "name=value pairs"),
    (b"--b\r\nContent-Type: x\r\n\r\nabc\r\n--b--", "multipart/form-data; boundary=b",
     "without Content-Disposition"),
    (b"--b\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--b--", "multipart/form-data; "
     "boundary=b", "without a field name"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--b\r\n"
     b"Content-Disposition: form-data; name=a\r\n\r\n2\r\n--b--\r\n",
     "multipart/form-data; boundary=b", "given twice"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1", "multipart/form-data; "
     "boundary=b", "before its closing boundary"),
    (b"", "multipart/form-data; boundary=b", "without its boundary"),
    (b"x", "text/plain", "not a form content type"),
])
def test_malformed_forms_are_a_400_naming_the_problem(body, ctype, message):
    with pytest.raises(BadInput, match=message) as caught:
        decode_form(body, ctype)
    assert caught.value.reason == "bad_form"
