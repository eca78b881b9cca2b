"""The run checks of ``roclip_plugin.checks`` that stand alone: the pool's memory."""

from __future__ import annotations

import pytest

from roclip_plugin.checks import check_pool_fits, device_memory_bytes, pool_bytes


def test_a_pool_larger_than_memory_is_refused_with_its_size() -> None:
    """2e9 captions of width 32 would take 238 GiB: refused on a 128 GiB machine."""
    assert pool_bytes(2_000_000_000, 32) == 256_000_000_000
    with pytest.raises(ValueError, match=r"--roclip-pool-size 2000000000: .* 238\.4 GiB") as err:
        check_pool_fits(2_000_000_000, 32, 128 * 2**30)
    assert "lower --roclip-pool-size (at most 1073741824 fits" in str(err.value)


def test_a_pool_that_fits_or_an_unknown_width_passes() -> None:
    check_pool_fits(65_536, 1024, 2**30)  # 256 MiB of 1 GiB
    check_pool_fits(2_000_000_000, None, 2**30)  # width unknown: not judged
    check_pool_fits(2_000_000_000, 32, None)  # memory unknown: not judged
    with pytest.raises(ValueError, match="--roclip-pool-size 65537"):
        check_pool_fits(65_537, 4096, 2**30)  # one row past 1 GiB


def test_this_machines_memory_is_known() -> None:
    memory = device_memory_bytes("cpu")
    assert memory is not None and memory > 2**28
