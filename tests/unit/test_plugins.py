"""The OIP plugin jar is built once per set of sources and TorchServe, into Kiln's cache."""

import shutil
import zipfile

import pytest

from kiln.deploy import plugins


def make_source(tmp_path):
    source = tmp_path / "oip_plugin"
    (source / "src").mkdir(parents=True)
    (source / "src" / "A.java").write_text("class A {}")
    (source / "build.sh").write_text("")
    return source


def test_the_jar_folder_is_named_by_the_sources_and_torchserve(tmp_path):
    source, cache = make_source(tmp_path), tmp_path / "cache"
    first = plugins.plugins_dir(source, cache)
    assert first.parent == cache
    assert first.name.startswith("torchserve-0.12.0-")
    assert plugins.plugins_dir(source, cache) == first
    (source / "src" / "A.java").write_text("class A { int a; }")
    assert plugins.plugins_dir(source, cache) != first
    (source / "src" / "A.java").write_text("class A {}")
    (source / "src" / "__pycache__").mkdir()
    (source / "src" / "__pycache__" / "x.pyc").write_bytes(b"")
    assert plugins.plugins_dir(source, cache) == first


def test_a_cached_jar_is_used_as_it_is(tmp_path, monkeypatch):
    source, cache = make_source(tmp_path), tmp_path / "cache"
    folder = plugins.plugins_dir(source, cache)
    folder.mkdir(parents=True)
    (folder / plugins.JAR_NAME).write_bytes(b"")
    monkeypatch.setattr(shutil, "which", lambda name: pytest.fail("a build was attempted"))
    assert plugins.ensure_built(source, cache) == folder


def test_the_default_cache_is_the_users_not_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = plugins.plugins_dir()
    assert folder.parent == tmp_path / "kiln" / "oip-plugin"
    assert plugins.OIP_PLUGIN_SOURCE not in folder.parents


@pytest.mark.skipif(shutil.which("javac") is None, reason="javac is not installed")
def test_the_plugin_builds_with_warnings_as_errors(tmp_path):
    """build.sh compiles with -Xlint:all -Werror against the installed TorchServe."""
    source = tmp_path / "oip_plugin"
    shutil.copytree(plugins.OIP_PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build"))
    folder = plugins.ensure_built(source, tmp_path / "cache")
    # TorchServe puts every jar in plugins_path on the classpath: this one alone is there.
    assert [p.name for p in folder.iterdir()] == [plugins.JAR_NAME]
    assert list(folder.parent.iterdir()) == [folder]  # no partial build left beside it
    assert oct(folder.stat().st_mode & 0o777) == "0o755"
    with zipfile.ZipFile(folder / plugins.JAR_NAME) as built:
        names = set(built.namelist())
    assert {"kiln/oip/OipServer.class", "kiln/oip/BinaryTensors.class",
            "META-INF/services/org.pytorch.serve.servingsdk.ModelServerEndpoint"} <= names
    # The JDK's HTTP server is gone: Netty, which TorchServe carries, serves OIP.
    for path in (source / "src").rglob("*.java"):
        assert "com.sun.net.httpserver" not in path.read_text(), path.name
