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
