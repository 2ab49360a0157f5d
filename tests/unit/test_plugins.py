"""The OIP plugin jar is rebuilt when, and only when, its sources are newer."""

import os
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


def test_missing_jar_is_stale(tmp_path):
    source = make_source(tmp_path)
    assert plugins.is_stale(source / "build" / "kiln-oip.jar", source) is True


def test_jar_is_stale_only_when_a_source_is_newer(tmp_path):
    source = make_source(tmp_path)
    jar = source / "build" / "kiln-oip.jar"
    jar.parent.mkdir()
    jar.write_bytes(b"")
    os.utime(source / "src" / "A.java", (1000, 1000))
    os.utime(source / "build.sh", (1000, 1000))
    os.utime(jar, (2000, 2000))
    assert plugins.is_stale(jar, source) is False
    os.utime(source / "src" / "A.java", (3000, 3000))
    assert plugins.is_stale(jar, source) is True


def test_the_build_folder_is_not_a_source(tmp_path):
    source = make_source(tmp_path)
    (source / "build").mkdir()
    (source / "build" / "kiln-oip.jar").write_bytes(b"")
    assert [p.name for p in plugins.plugin_sources(source)] == ["build.sh", "A.java"]


@pytest.mark.skipif(shutil.which("javac") is None, reason="javac is not installed")
def test_the_plugin_builds_with_warnings_as_errors(tmp_path):
    """build.sh compiles with -Xlint:all -Werror against the installed TorchServe."""
    source = tmp_path / "oip_plugin"
    shutil.copytree(plugins.OIP_PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build"))
    jar = plugins.ensure_built(source / "build" / "kiln-oip.jar", source)
    with zipfile.ZipFile(jar) as built:
        names = set(built.namelist())
    assert {"kiln/oip/OipServer.class", "kiln/oip/BinaryTensors.class",
            "META-INF/services/org.pytorch.serve.servingsdk.ModelServerEndpoint"} <= names
    # The JDK's HTTP server is gone: Netty, which TorchServe carries, serves OIP.
    for path in (source / "src").rglob("*.java"):
        assert "com.sun.net.httpserver" not in path.read_text(), path.name
