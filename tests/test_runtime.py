import sys

import pytest

from ldmkit.runtime import tune_allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_allocator_applies_on_glibc(monkeypatch):
    monkeypatch.delenv("LDMKIT_NO_MALLOC_TUNING", raising=False)
    assert tune_allocator() is True


def test_tune_allocator_can_be_disabled(monkeypatch):
    monkeypatch.setenv("LDMKIT_NO_MALLOC_TUNING", "1")
    assert tune_allocator() is False


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os

    from ldmkit.checkpoint import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
