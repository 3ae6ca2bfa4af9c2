"""Every expert test runs torch on one thread; the example plugin's fixtures (`example_plugin`,
`example_module`) live in tests/conftest.py, shared with the serving and agents tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _tiny_tensors_on_one_thread(one_torch_thread: None) -> None:
    """Every expert test runs torch on one thread (see `one_torch_thread`)."""
