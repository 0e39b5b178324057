"""Attention backends: PyTorch's fused SDPA and plain matmuls compute the same softmax(q k^T / sqrt(d)) v."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import rel_err
from ldm.modules.attention import FLASH_MAX_HEAD, CrossAttention, attention, resolve_backend, set_attention
from ldm.util import optimize_for_inference


def softmax_attention(q, k, v):
    """The formula in NumPy, float64."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


@pytest.mark.parametrize("backend", ["auto", "sdpa", "matmul"])
@pytest.mark.parametrize("shape", [(3, 1, 50, 384), (2, 4, 7, 12)])
def test_backends_compute_the_formula(backend, shape):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(shape, generator=generator)
    k, v = (torch.randn(shape[:2] + (5,) + shape[3:], generator=generator) for _ in range(2))  # 5 keys: cross
    expected = softmax_attention(*(t.double().numpy() for t in (q, k, v)))
    out = attention(q, k, v, backend)
    assert out.shape == q.shape
    assert rel_err(out, expected) < 1e-5


def test_matmul_backend_in_bf16_is_close_to_the_formula():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 1, 64, 96, generator=generator) for _ in range(3))
    expected = softmax_attention(*(t.double().numpy() for t in (q, k, v)))
    out = attention(*(t.bfloat16() for t in (q, k, v)), "matmul")
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), expected) < 2e-2


def test_unet_with_matmul_attention_matches_golden(tiny_model, golden):
    model = optimize_for_inference(copy.deepcopy(tiny_model), attention="matmul")
    layers = [m for m in model.modules() if isinstance(m, CrossAttention)]
    assert layers and all(m.backend == "matmul" for m in layers)
    x, t, cond = (torch.from_numpy(golden[k]) for k in ("x", "t", "cond"))
    with torch.no_grad():
        eps = model.apply_model(x, t, cond)
    assert rel_err(eps, golden["eps"]) < 1e-5
    assert all(m.backend == "auto" for m in tiny_model.modules() if isinstance(m, CrossAttention))


def test_auto_backend_takes_matmul_only_on_cuda_for_heads_wider_than_flash():
    def query(is_cuda, head):
        return SimpleNamespace(is_cuda=is_cuda, shape=(2, 1, 64, head))  # what resolve_backend reads of q
    assert resolve_backend("auto", query(True, FLASH_MAX_HEAD + 1)) == "matmul"  # cin256-v2: heads of 384-960
    assert resolve_backend("auto", query(True, FLASH_MAX_HEAD)) == "sdpa"
    assert resolve_backend("auto", query(False, 960)) == "sdpa"  # the CPU
    assert resolve_backend("matmul", query(False, 8)) == "matmul"
    assert resolve_backend("sdpa", query(True, 960)) == "sdpa"


def test_unknown_backend_is_refused(tiny_model):
    with pytest.raises(ValueError, match="auto, sdpa, matmul"):
        set_attention(copy.deepcopy(tiny_model), "flash")
