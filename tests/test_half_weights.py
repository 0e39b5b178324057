"""UNet weights stored in bf16 (`ldm.util.store_weights`): the same results as autocast, float32 where it must be.

Tolerance against autocast: none (bit-identical). Stored weights are the values autocast casts to on every call,
and each activation is rounded to bf16 at the same points (the final normalization and activation run in float32
in both), so the same kernels see the same inputs. Against fp32: the relative error of bf16 sampling (about 1e-2
here) is only checked to be small.
"""
import argparse
import copy

import pytest
import torch

from conftest import TINY_CKPT, TINY_CONFIG
from ldm import cli
from ldm.models.diffusion.cache import SamplerStats, UNetCalls
from ldm.models.diffusion.modes import parse_mode
from ldm.modules.attention import CrossAttention
from ldm.sampling import decode_latents, sample_generators, sample_latents
from ldm.util import optimize_for_inference, precision_context, store_weights, stored_precision

MODES = ["ddim", "ddim+fd:uniform:3", "ddim+deepcache:3", "plms+fd:uniform:4", "dpmpp2m+deepcache:2"]
LABELS = torch.tensor([3, 997])


@pytest.fixture(scope="module")
def bf16_model(tiny_model):
    return store_weights(copy.deepcopy(tiny_model), "bf16")


def latents(model, spec, precision, steps=10):
    return sample_latents(model, LABELS, steps, 3.0, mode=parse_mode(spec), precision=precision,
                          generators=sample_generators(0, range(len(LABELS))))[0]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_weights_are_half_where_they_compute_and_float32_elsewhere(tiny_model, bf16_model):
    unet = bf16_model.unet
    assert stored_precision(unet) == "bf16" and unet.dtype == torch.bfloat16
    for (name, module), original in zip(unet.named_modules(), tiny_model.unet.modules()):
        norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for param, before in zip(module.parameters(recurse=False), original.parameters(recurse=False)):
            assert param.dtype == (torch.float32 if norm else torch.bfloat16), name
            assert torch.equal(param, before.to(param.dtype)), name  # rounded once; norms untouched
    for part in (bf16_model.first_stage_model, bf16_model.cond_stage_model):
        assert all(p.dtype == torch.float32 for p in part.parameters())
    assert stored_precision(tiny_model.unet) == "fp32"


@pytest.mark.parametrize("spec", MODES)
def test_stored_bf16_equals_autocast_bf16(tiny_model, bf16_model, spec):
    stored = latents(bf16_model, spec, "bf16")
    autocast = latents(tiny_model, spec, "bf16")
    fp32 = latents(tiny_model, spec, "fp32")
    assert stored.dtype == torch.float32
    assert torch.equal(stored, autocast)
    assert 1e-4 < rel_err(stored, fp32) < 0.05


def test_one_unet_call_equals_autocast(tiny_model, bf16_model):
    torch.manual_seed(0)
    x, t, context = torch.randn(3, 3, 16, 16), torch.tensor([999, 400, 0]), torch.randn(3, 1, 16)
    with torch.autocast("cpu", torch.bfloat16):
        expected = tiny_model.unet(x, t, context)
    out = bf16_model.unet(x, t, context)
    assert out.dtype == torch.float32  # forward returns the input's dtype
    assert torch.equal(out, expected.float())


def test_cached_decoder_calls_give_float32_noise_like_the_whole_unet(bf16_model):
    """FasterDiffusion's decoder calls return float32 (the last convolution's bf16 result, widened), as the whole
    UNet does: the guidance is combined in float32 either way, and compiled, the one-step decoder is one graph."""
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 3, 16, 16), torch.tensor([999, 400]), torch.randn(2, 1, 16)
    calls = UNetCalls(bf16_model, "bf16", SamplerStats())
    skips, mid = calls.encode(x, t, context)
    noise = calls.decode(skips, mid, t.repeat(2), context.repeat(2, 1, 1))
    assert noise.dtype == torch.float32 and calls.full(x, t, context).dtype == torch.float32
    expected = bf16_model.unet.decode(skips, mid, t.repeat(2), context.repeat(2, 1, 1))
    assert expected.dtype == torch.bfloat16 and torch.equal(noise, expected.float())


def test_decoding_is_unchanged(tiny_model, bf16_model):
    z = latents(tiny_model, "ddim", "fp32", steps=2)
    assert torch.equal(decode_latents(bf16_model, z, "bf16"), decode_latents(tiny_model, z, "bf16"))


def test_sampling_stored_weights_in_another_precision_is_refused(bf16_model):
    with pytest.raises(ValueError, match="stores its weights in bf16: sample it with precision 'bf16', not 'fp32'"):
        latents(bf16_model, "ddim", "fp32", steps=2)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        precision_context("fp16", bf16_model.unet, "cpu")


def test_fp16_weights_need_a_gpu(tiny_model):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        store_weights(copy.deepcopy(tiny_model), "fp16")


def test_fp32_stays_as_it_is(tiny_model):
    model = optimize_for_inference(copy.deepcopy(tiny_model), precision="fp32")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(latents(model, "ddim+fd:uniform:3", "fp32", steps=4),
                       latents(tiny_model, "ddim+fd:uniform:3", "fp32", steps=4))


@pytest.fixture
def backend_flags():
    """PyTorch's TF32 and cuDNN autotuner flags, restored after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_front_end_precision_stores_the_weights_and_sets_the_backend_flags(backend_flags):
    args = cli.Parser()
    cli.add_model_args(args)
    cli.add_sampling_args(args)
    cli.add_device_args(args)
    parsed = args.parse_args(["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT), "--precision", "bf16",
                              "--tf32", "off", "--cudnn_benchmark", "off", "--attention", "matmul",
                              "--device", "cpu"])
    only_load_flags = argparse.Namespace(**{flag: getattr(parsed, flag) for flag in cli.LOAD_FLAGS})
    model = cli.load(only_load_flags, torch.device("cpu"))  # load reads LOAD_FLAGS (frontier.py's models share on them)
    assert stored_precision(model.unet) == "bf16"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark
    assert {m.backend for m in model.modules() if isinstance(m, CrossAttention)} == {"matmul"}
    model = cli.load(args.parse_args(["--config", str(TINY_CONFIG), "--ckpt", str(TINY_CKPT)]), torch.device("cpu"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # --tf32 on, the default
    assert torch.backends.cudnn.benchmark  # --cudnn_benchmark on, the default
    assert {m.backend for m in model.modules() if isinstance(m, CrossAttention)} == {"auto"}
