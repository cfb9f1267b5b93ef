"""The allocator settings of training processes (trainer/alloc.py)."""

from __future__ import annotations

import pytest

from koopman_search.trainer import alloc
from koopman_search.trainer.alloc import GLIBC_TUNED, allocator_env, chosen_allocator
from koopman_search.trainer.errors import ConfigError


def test_glibc_tuned_adds_the_tunables_and_keeps_the_users_own() -> None:
    env = allocator_env("glibc-tuned", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{GLIBC_TUNED}"
    assert env["PATH"] == "/bin" and env["KOOPMAN_MALLOC"] == "glibc-tuned"
    assert allocator_env("glibc-tuned", env)["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]  # not added twice


def test_glibc_removes_this_modules_settings_only() -> None:
    env = allocator_env("glibc", {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{GLIBC_TUNED}"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    assert "GLIBC_TUNABLES" not in allocator_env("glibc", {"GLIBC_TUNABLES": GLIBC_TUNED})


def test_jemalloc_is_preloaded_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alloc, "jemalloc_path", lambda: "/lib/libjemalloc.so.2")
    env = allocator_env("jemalloc", {"LD_PRELOAD": "/lib/other.so", "GLIBC_TUNABLES": GLIBC_TUNED})
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2:/lib/other.so"
    assert "GLIBC_TUNABLES" not in env
    assert allocator_env("glibc", env)["LD_PRELOAD"] == "/lib/other.so"


def test_jemalloc_falls_back_to_glibc_tuned_where_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(alloc, "jemalloc_path", lambda: None)
    env = allocator_env("jemalloc", {})
    assert env["KOOPMAN_MALLOC"] == "glibc-tuned" and env["GLIBC_TUNABLES"] == GLIBC_TUNED
    assert "LD_PRELOAD" not in env
    assert "apt-get install libjemalloc2" in caplog.text


def test_the_choice_comes_from_koopman_malloc_and_defaults_to_glibc() -> None:
    assert chosen_allocator({}) == "glibc"
    assert chosen_allocator({"KOOPMAN_MALLOC": "jemalloc"}) == "jemalloc"
    with pytest.raises(ConfigError, match=r"KOOPMAN_MALLOC must be one of .*, but got KOOPMAN_MALLOC='tcmalloc'"):
        chosen_allocator({"KOOPMAN_MALLOC": "tcmalloc"})
