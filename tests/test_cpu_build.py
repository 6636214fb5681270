"""Where and how the C++ CPU kernels are built and loaded: a private per-user cache, and
one clear warning when the compiler is missing or too old."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys

import pytest

from meshserve.pallas_kernels import cpu_build
from meshserve.pallas_kernels.row_reductions import ops as row_ops


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """cpu_build with no kernel loaded yet and its cache under tmp_path."""
    monkeypatch.setattr(cpu_build, "_loaded", {})
    monkeypatch.setattr(cpu_build, "_toolchain", None)
    monkeypatch.setattr(cpu_build, "_warned", set())
    cache = tmp_path / "cache" / "kernels"
    monkeypatch.setenv(cpu_build.CACHE_ENV_VAR, str(cache))
    return cache


def _load_in_child(cache) -> subprocess.CompletedProcess:
    """Load the row-reduction kernel in a fresh process (an FFI target registers once per
    process, so this one must not load a second copy)."""
    code = ("from meshserve.pallas_kernels import cpu_build\n"
            "from meshserve.pallas_kernels.row_reductions import ops\n"
            "cpu_build.load(ops.SOURCE, ops._TARGETS)\n")
    env = {**os.environ, cpu_build.CACHE_ENV_VAR: str(cache)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)


def test_cache_is_created_private_and_the_library_is_the_users(fresh_build):
    done = _load_in_child(fresh_build)
    assert done.returncode == 0, done.stderr
    info = os.stat(fresh_build)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    (lib,) = fresh_build.glob("*.so")
    assert not stat.S_IMODE(lib.stat().st_mode) & 0o022


def test_a_shared_cache_of_ours_is_made_private(fresh_build):
    fresh_build.mkdir(parents=True)
    os.chmod(fresh_build, 0o777)
    assert cpu_build.cache_dir() == str(fresh_build)
    assert stat.S_IMODE(os.stat(fresh_build).st_mode) == 0o700


def test_a_cache_owned_by_someone_else_is_refused(fresh_build, monkeypatch):
    fresh_build.mkdir(parents=True)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(fresh_build).st_uid + 1)
    with pytest.raises(cpu_build.KernelBuildError, match="belongs to uid"):
        cpu_build.cache_dir()


def test_a_planted_writable_library_is_not_loaded(fresh_build):
    assert _load_in_child(fresh_build).returncode == 0
    (lib,) = fresh_build.glob("*.so")
    os.chmod(lib, 0o777)  # as if another account could have replaced it
    done = _load_in_child(fresh_build)
    assert done.returncode != 0 and "refusing to load" in done.stderr


def test_a_link_as_cache_is_refused(fresh_build, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    fresh_build.parent.mkdir(parents=True)
    os.symlink(target, fresh_build)
    with pytest.raises(cpu_build.KernelBuildError, match="not a directory"):
        cpu_build.cache_dir()


@pytest.mark.parametrize(
    "script,message",
    [
        ('case "$1" in --version) echo "g++ (Fake) 7.5.0";; *) echo 7.5.0;; esac',
         "is g\\+\\+ 7.5; the kernels need g\\+\\+ >= 9.0 or clang\\+\\+ >= 10.0"),
        ('case "$1" in --version) echo "clang version 6.0.1";; *) echo 6.0.1;; esac',
         "is clang\\+\\+ 6.0; the kernels need"),
    ],
    ids=["old-gcc", "old-clang"],
)
def test_an_old_compiler_warns_once_naming_the_version(
    fresh_build, tmp_path, monkeypatch, caplog, script, message
):
    fake = tmp_path / "fake-cxx"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    from meshserve.pallas_kernels.packed_matmul import ops as matmul_ops

    with caplog.at_level(logging.WARNING, logger=cpu_build.__name__):
        assert not cpu_build.available(row_ops.SOURCE, row_ops._TARGETS)
        assert not cpu_build.available(matmul_ops.SOURCE, matmul_ops._TARGETS)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert re.search(message, warnings[0])
    assert not list(fresh_build.glob("*.so"))


def test_no_compiler_warns_once(fresh_build, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "missing-compiler"))
    monkeypatch.setattr(cpu_build.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=cpu_build.__name__):
        assert not cpu_build.available(row_ops.SOURCE, row_ops._TARGETS)
        assert not cpu_build.available(row_ops.SOURCE, row_ops._TARGETS)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "no C++ compiler" in warning and "g++ >= 9.0" in warning
