from __future__ import annotations

from roclip_kit.tensor_runs import run_specs


def test_no_spec_left_starts_no_pool() -> None:
    # A resumed grid whose runs are all cached hands run_specs nothing: that is no error.
    assert run_specs([], processes=4) == []
