"""The glibc allocator setting the CLI applies at start-up."""

from __future__ import annotations

import platform

import pytest

from geomprobe.allocator import retain_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_retain_freed_memory_takes_effect_on_glibc():
    assert retain_freed_memory() is True


def test_retain_freed_memory_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("GEOMPROBE_MALLOC", "default")
    assert retain_freed_memory() is False


def test_retain_freed_memory_without_mallopt_is_false(monkeypatch):
    """Where the C library has no mallopt (macOS, Windows) the call is a no-op returning False."""
    import ctypes

    class NoMallopt:
        def __init__(self, *_args, **_kwargs):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert retain_freed_memory() is False
