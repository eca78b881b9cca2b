"""Nearest-caption search on a CUDA device equals the CPU's exact answer (gpu-marked)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matching_problems import CHUNKS, PRECISIONS, assert_fp32_answer, clustered, exact_problems

from roclip_plugin.matching import TorchMatcher, brute_force_nearest, nearest_captions
from roclip_plugin.pool import CaptionPool


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@given(
    problem=exact_problems(),
    precision=st.sampled_from(PRECISIONS),
    chunk=st.sampled_from(CHUNKS),
)
@settings(max_examples=40, deadline=None)
def test_cuda_equals_cpu_brute_force(
    problem: tuple[torch.Tensor, torch.Tensor], precision: str, chunk: int
) -> None:
    images, pool = problem
    want = brute_force_nearest(images, pool)
    got = nearest_captions(images.cuda(), pool.cuda(), precision=precision, chunk_size=chunk)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), want)
    cuda_pool = CaptionPool(pool.shape[0] + 3, device="cuda")
    cuda_pool.enqueue(pool.cuda())
    got = TorchMatcher(precision, chunk)(images.cuda(), cuda_pool)
    assert torch.equal(got.cpu(), want)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # TF32 must not leak into the search
        got = nearest_captions(images.cuda(), pool.cuda(), precision=precision, chunk_size=chunk)
        assert torch.equal(got.cpu(), want)
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_clustered_equals_fp32() -> None:
    images, pool = clustered(11, 3, 2000, 64, 256)
    want = nearest_captions(images.cuda(), pool.cuda(), precision="fp32")
    got = nearest_captions(images.cuda(), pool.cuda(), precision="bf16", chunk_size=300)
    assert_fp32_answer(got, want, images, pool)
    assert_fp32_answer(want, brute_force_nearest(images, pool), images, pool)
