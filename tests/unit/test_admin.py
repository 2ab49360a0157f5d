"""The admin route's parts that need no server: admin keys, arguments, revoke, nginx's block."""

import re
import time
from pathlib import Path

import pytest

from kiln.cli.keys import revoke
from kiln.deploy import admin_service, front
from kiln.keys import Key, write_keys

A, B = "a" * 43, "b" * 43


def test_admin_keys_are_read_again_when_the_file_changes(tmp_path):
    path = tmp_path / "admin_keys"
    keys = admin_service.AdminKeys(path)
    assert keys.check(f"Bearer {A}") is None  # no file: nobody
    write_keys(path, [Key(A)])
    assert keys.check(f"Bearer {A}") == A[:6]
    assert keys.check(f"bearer {A}") == A[:6]
    assert keys.check(f"Bearer {B}") is None
    write_keys(path, [Key(A, expires=time.time() - 1), Key(B)])
    assert (keys.check(f"Bearer {A}"), keys.check(f"Bearer {B}")) == (None, B[:6])
    for header in (None, "", B, f"Basic {B}", f"Bearer {B} x", f"Bearer  {B}", f"Bearer {B[:-1]}"):
        assert keys.check(header) is None, header


def test_a_broken_admin_keys_file_lets_nobody_in(tmp_path):
    path = tmp_path / "admin_keys"
    write_keys(path, [Key(A)])
    keys = admin_service.AdminKeys(path)
    assert keys.check(f"Bearer {A}") == A[:6]
    path.write_text(f"{A} expires=tomorrow\n")
    assert keys.check(f"Bearer {A}") is None


@pytest.mark.parametrize(("action", "body", "error"), [
    ("promote", {"version": "2.0", "force": True},
     "promote takes no force (it takes: version)"),
    ("rollback", {"version": "2.0"}, "rollback takes no version (it takes: nothing)"),
    ("promote", {}, '"version" must be a string (say "2.0")'),
    ("promote", {"version": "../x"}, "version '../x': letters, digits, '.' and '_' only (say 2.0)"),
    ("route", {"weights": []}, '"weights" must be an object of version: percent, or null'),
    ("route", {"weights": {"1.0": True}}, "the weight of 1.0 must be a number"),
    ("shadow", {"version": "2.0", "fraction": "all"}, '"fraction" must be a number'),
    ("deploy", {"backend": "tensorrt"}, '"backend" must be one of onnx, torchscript'),
    ("deploy", {"allow_signature_change": "yes"}, '"allow_signature_change" must be true or false'),
])
def test_bad_arguments_are_400_before_anything_is_done(tmp_path, action, body, error):
    """No server runs in tmp_path: an action that got past its arguments would say so (422)."""
    service = type("S", (), {"run_dir": tmp_path, "store": tmp_path, "models_dirs": []})()
    assert admin_service.do_action(service, "lenet", action, body) == (400, {"error": error})
    assert not (tmp_path / "versions.json").exists()


def test_revoke_names_one_key_and_keeps_a_valid_one():
    keys = [Key(A), Key(B)]
    assert revoke(keys, A[:6], time.time()) == [Key(B)]
    assert revoke(keys, B, time.time()) == [Key(A)]
    with pytest.raises(ValueError, match="revoke needs the key, or its first 6"):
        revoke(keys, "aaa", time.time())
    with pytest.raises(ValueError, match=r"no keys start with cccccc\.\.\.: give more of it"):
        revoke(keys, "c" * 6, time.time())
    with pytest.raises(ValueError, match="that is the last valid key: rotate first"):
        revoke([Key(A), Key(B, expires=time.time() - 1)], A, time.time())


def settings(tmp_path: Path, admin_port=None) -> front.FrontSettings:
    return front.FrontSettings(
        nginx_dir=tmp_path, keys_file=tmp_path / "keys", listen="127.0.0.1",
        public={"http": 1, "oip": 2, "grpc": 3, "oip-grpc": 11, "metrics": 4},
        upstream={"http": 5, "oip": 6, "grpc": 7, "oip-grpc": 10, "metrics": 8}, max_body=1024,
        ready_path="/ready", live_path="/live", draining_flag=tmp_path / "draining",
        route_state=tmp_path / "versions.json", admin_port=admin_port,
        admin_socket=tmp_path / "kiln-admin.sock" if admin_port else None)


def test_the_admin_port_is_rendered_only_when_asked(tmp_path):
    listens = re.findall(r"listen 127\.0\.0\.1:(\d+)", front.render(settings(tmp_path)))
    assert listens == ["1", "2", "4", "3", "11"]
    text = front.render(settings(tmp_path, admin_port=9))
    assert re.findall(r"listen 127\.0\.0\.1:(\d+)", text) == ["1", "2", "4", "3", "11", "9"]
    block = text[text.index("listen 127.0.0.1:9;"):]
    assert f"proxy_pass http://unix:{tmp_path}/kiln-admin.sock:;" in block
    assert "client_max_body_size 16384;" in block
    assert "proxy_set_header Authorization $http_authorization;" in block
    assert "if ($kiln_path_refused)" in block and "if ($kiln_path_long)" in block
    # A service that is down is named, not TorchServe.
    assert '{"error": "the admin service is not answering", "code": 502}' in block
    assert "TorchServe" not in block
