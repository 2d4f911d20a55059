"""Fixtures for the serving tests; the helpers are in `serve_helpers`."""
from __future__ import annotations

import pytest

from serve_helpers import make_served


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(trained float model, served model folder) with 8-bit local tables."""
    return make_served(tmp_path_factory)
