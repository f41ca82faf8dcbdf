"""`sdpa`'s causal alignment, on every branch it can take, against attention written out by hand."""

from __future__ import annotations

import warnings

import pytest
import torch

from pixtral.model.attention import lower_right_causal_sdpa, sdpa


def reference(q, k, v, causal: bool) -> torch.Tensor:
    """[T, H, D] attention in float64 with key heads repeated; causal = bottom-right aligned."""
    lq, lk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, dim=1), v.double().repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    if causal:
        keep = torch.arange(lk)[None, :] <= torch.arange(lk - lq, lk)[:, None]
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


@pytest.mark.parametrize("lq,lk", [(7, 7), (1, 9), (5, 12), (12, 12)])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_hand_written_attention(lq, lk, causal):
    g = torch.Generator().manual_seed(lq * 100 + lk)
    q, k, v = torch.randn(lq, 4, 8, generator=g), torch.randn(lk, 2, 8, generator=g), torch.randn(lk, 2, 8, generator=g)
    torch.testing.assert_close(sdpa(q, k, v, causal=causal), reference(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_chunk_after_prefix_sees_its_own_past_only():
    """The last query of a chunk sees every key; the first sees the prefix and itself."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, generator=g), torch.randn(10, 2, 4, generator=g), torch.randn(10, 2, 4, generator=g)
    out = sdpa(q, k, v, causal=True)
    torch.testing.assert_close(out[0], sdpa(q[:1], k[:8], v[:8])[0])
    torch.testing.assert_close(out[2], sdpa(q[2:], k, v)[0])


def test_gpu_branch_lower_right_bias_matches_the_mask():
    """The CUDA branch (PyTorch's causal_lower_right bias, key heads repeated) gives the same
    attention as the boolean-mask branch; on the CPU PyTorch materialises the bias."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(6, 8, 16, generator=g), torch.randn(15, 2, 16, generator=g), torch.randn(15, 2, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU: "no fused kernel for lower-right causal", by design here
        out = lower_right_causal_sdpa(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
    torch.testing.assert_close(out, sdpa(q, k, v, causal=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference(q, k, v, True), atol=1e-5, rtol=1e-5)
