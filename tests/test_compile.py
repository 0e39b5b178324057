"""torch.compile of the UNet and its halves: FasterDiffusion's decoder calls padded to a few bucket sizes (same
results), the shapes compiled before sampling (none during it), and compiled results equal to eager ones on the
CPU."""
import argparse
import copy
import itertools
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CONFIG, load_script
from ldm import sampling_run
from ldm import cli
from ldm.compile import (bucket_for, choose_buckets, compile_unet, decoder_call_steps, mode_buckets, padded_decode,
                         use_compile_cache, warm_up)
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.models.diffusion.modes import Mode, parse_mode
from ldm.sampling import sample_generators, sample_latents
from ldm.util import instantiate_from_config

LABELS = torch.tensor([5])


def latents(model, mode, steps=10):
    return sample_latents(model, LABELS, steps, 3.0, mode=mode, generators=sample_generators(0, range(len(LABELS))))[0]


def recording(decode, seen):
    """decode, counting in `seen` the step counts of its calls."""
    def call(skips, mid, timesteps, *args, **kwargs):
        seen[len(timesteps) // len(mid)] += 1
        return decode(skips, mid, timesteps, *args, **kwargs)
    return call


def recorded_decoder_steps(model, mode, steps):
    """Counter of the step counts of the decoder calls that sampling really makes."""
    model, seen = copy.deepcopy(model), Counter()
    model.unet.decode = recording(model.unet.decode, seen)
    latents(model, mode, steps)
    return seen


@pytest.mark.parametrize("key_steps, max_decoder_batch", [("uniform:3", None), ("0,1,2,5", None), ("0,7", 6)])
def test_decoder_call_steps_are_those_sampling_makes(tiny_model, key_steps, max_decoder_batch):
    plan = FasterDiffusion(key_steps, max_decoder_batch=max_decoder_batch)
    rows = 2 * len(LABELS)  # guidance
    assert decoder_call_steps(plan, 10, rows) == recorded_decoder_steps(tiny_model, Mode("ddim", plan), 10)


def padding(counts, buckets):
    return sum(calls * (bucket_for(n, buckets) - n) for n, calls in counts.items())


@pytest.mark.parametrize("counts", [
    {1: 26, 5: 5, 6: 1, 10: 7, 11: 4, 12: 2, 15: 1, 20: 2},  # ldm250
    {1: 7, 5: 2, 10: 1, 13: 1, 15: 1, 20: 1, 25: 3, 30: 2, 40: 1},  # ldm250-fast
    {2: 1, 3: 100, 4: 1, 9: 1},
    {1: 4},
])
@pytest.mark.parametrize("max_shapes", [1, 2, 4])
def test_buckets_pad_the_fewest_steps(counts, max_shapes):
    buckets = choose_buckets(Counter(counts), max_shapes)
    sizes = sorted(n for n in counts if n > 1)
    assert len(buckets) <= max_shapes and 1 not in buckets
    assert all(bucket_for(n, buckets) >= n for n in counts)
    if sizes:
        assert buckets[-1] == sizes[-1]  # nothing is padded past the largest call
    best = min(padding(counts, subset) for k in range(1, max_shapes + 1)
               for subset in itertools.combinations(sizes, k) if not sizes or sizes[-1] in subset) if sizes else 0
    assert padding(counts, buckets) == best


def test_published_key_steps_need_five_decoder_shapes():
    buckets = mode_buckets([parse_mode("ddim+fd:ldm250")], 250, 8)
    assert buckets == (5, 10, 12, 20)  # with the one-step calls: 5 decoder shapes instead of 8
    counts = decoder_call_steps(FasterDiffusion("ldm250"), 250, 8)
    assert padding(counts, buckets) == 13  # of 250 decoded steps


def test_padded_decoder_calls_give_the_same_results(tiny_model):
    mode = parse_mode("ddim+fd:0,3,5,7")  # groups of 3, 2, 2 and 3 steps
    model, seen = copy.deepcopy(tiny_model), Counter()
    model.unet.decode = padded_decode(recording(model.unet.decode, seen), buckets=(3,))
    padded = latents(model, mode)
    assert seen == Counter({3: 4})  # every call decodes 3 steps
    # float32 tolerance of the golden tests: another batch shape may pick kernels that sum in another order
    # (2.3e-6 seen on one CPU); a padded row leaking into a real one would differ by far more
    torch.testing.assert_close(padded, latents(tiny_model, mode), rtol=1e-5, atol=1e-5)


def test_compile_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert use_compile_cache() == str(tmp_path / "outputs" / "cache" / "torch_compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == str(tmp_path / "mine")


def test_compile_for_compiles_the_modes_shapes_and_says_how_long(tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "compile_unet", lambda model, buckets: calls.append(("compile", buckets)))
    monkeypatch.setattr(cli, "warm_up", lambda *a: calls.append(("warm_up", a[2:])) or (2, 12.34))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/cache")
    mode = parse_mode("ddim+fd:0,3,5,7")
    args = argparse.Namespace(compile=True, steps=10, scale=3.0, precision="bf16")
    assert cli.compile_for(tiny_model, args, [mode], 1) == "compiled the UNet for 2 shapes in 12.3 s (compile cache: /cache)"
    assert calls == [("compile", (2, 3)), ("warm_up", (10, 1, True, "bf16", (2, 3)))]
    assert cli.compile_for(tiny_model, argparse.Namespace(compile=False), [mode], 1) is None


@pytest.fixture(scope="module")
def two_level_model(tiny_model):
    """The tiny model with a two-level UNet of its family (random weights): every kind of block the tiny UNet
    has (residual blocks with and without a channel change, a spatial transformer, down- and upsampling, the
    skips), in half the kernels. Inductor compiles each kernel with the C++ compiler: the tiny UNet's 106 take
    about 105 s on 2 cores, these 56 about 48 s."""
    config = OmegaConf.load(TINY_CONFIG).model.params.unet_config
    config.params.update(channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2])
    model = copy.deepcopy(tiny_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.model.diffusion_model = instantiate_from_config(config).eval()
    return model


@pytest.mark.slow
def test_compiled_on_the_cpu_equals_eager_and_compiles_before_sampling(two_level_model, monkeypatch, request,
                                                                      tmp_path):
    """Inductor on the CPU. The compile cache lives in pytest's cache folder: the first run compiles (under a
    minute on 2 cores), later runs load the compiled code (without pytest's cache, -p no:cacheprovider, each
    run compiles)."""
    from torch._dynamo.utils import counters

    cache = request.config.cache.mkdir("torch_compile") if hasattr(request.config, "cache") else tmp_path
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    modes = [parse_mode("ddim"), parse_mode("ddim+fd:0,3,5,7")]  # FD: decoder calls of 3, 2, 2 and 3 steps
    model = compile_unet(copy.deepcopy(two_level_model), buckets=(3,))  # the 2-step calls padded to 3 steps
    shapes, _ = warm_up(model, modes, 10, len(LABELS), True, "fp32", (3,))
    assert shapes == 3  # the whole UNet (DDIM), the encoder, the decoder at 3 steps
    graphs = counters["stats"]["unique_graphs"]
    compiled = [latents(model, mode) for mode in modes]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while sampling
    for mode, latent in zip(modes, compiled):
        torch.testing.assert_close(latent, latents(two_level_model, mode), rtol=1e-4, atol=1e-4)


def test_cuda_graphs_need_a_cuda_device(tiny_model):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        compile_unet(copy.deepcopy(tiny_model), cuda_graphs=True)


class OneRank:
    """One rank of a world of `size`, logging its collective steps; gather answers as if every rank took 2.0 s."""

    def __init__(self, rank, size, log):
        self.rank, self.size, self.log = rank, size, log

    def wait_all(self):
        self.log.append("wait")

    def gather(self, seconds):
        return [0.0] + [2.0] * (self.size - 1) if self.rank == 0 else None


@pytest.mark.parametrize("rank, order", [(0, ["compile", "wait"]), (1, ["wait", "compile"])])
def test_rank_0_compiles_first_and_the_others_then_load_its_cache(monkeypatch, rank, order):
    image_sample = load_script("scripts/image_sample.py")
    log = []
    monkeypatch.setattr(sampling_run.cli, "compile_for", lambda *a: log.append("compile") or "compiled in 9.0 s")
    args = argparse.Namespace(compile=True, batch_size=2)
    line = sampling_run.compile_in_turn(OneRank(rank, 3, log), None, args, None)
    assert log == order
    assert line == ("compiled in 9.0 s; the other 2 process(es) then took at most 2.0 s" if rank == 0 else None)
    assert sampling_run.compile_in_turn(OneRank(rank, 3, []), None, argparse.Namespace(compile=False), None) is None
