"""Fixtures of the OpenCLIP end-to-end tests: the data and tiny model, and two reference runs.

Session-scoped, so that the data and the two training runs several modules compare against are
made once, whichever modules run. Nothing here imports OpenCLIP or scikit-learn at import time:
a conftest cannot skip (pytest reports an error), so each test module skips itself where either
is missing (``pytest.importorskip``) and the fixtures import the helpers of runs.py when a test
asks for them.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits data (``data``: train.csv) and the tiny model (``model``) under ``root``."""
    from .runs import build_setup

    return build_setup(tmp_path_factory.mktemp("openclip"))


@pytest.fixture(scope="session")
def straight(setup) -> str:
    """An uninterrupted 3-epoch RoCLIP run, batch 16 (six steps an epoch)."""
    from .runs import ROCLIP, _argv, main

    assert main(_argv(setup, "straight", 3, *ROCLIP)) == 0
    return "straight"


@pytest.fixture(scope="session")
def evaluated(setup) -> str:
    """An uninterrupted 3-epoch run with evaluation, and the same run stopped after epoch 2."""
    from .runs import _argv, _stop_after_epoch_two, _validated, main

    assert main(_argv(setup, "val-straight", 3, *_validated(setup))) == 0
    _stop_after_epoch_two(_argv(setup, "val-stopped", 3, *_validated(setup)))
    return "val-straight"
