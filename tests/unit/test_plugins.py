"""The OIP plugin jar is rebuilt when, and only when, its sources are newer."""

import os

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
