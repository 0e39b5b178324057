"""Adaptive DeepCache: the limits that make it the solver or DeepCache, per-sample decisions, its counts and checks."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_CKPT, TINY_CONFIG, load_script, rel_err
from ldm.models.diffusion.adaptive import AdaptiveDeepCache
from ldm.models.diffusion.cache import UNetCall
from ldm.models.diffusion.deepcache import DeepCache
from ldm.models.diffusion.modes import format_mode, parse_mode
from ldm.util import load_model
from ldm.sampling import sample_generators, sample_labels, sample_latents

DIGITS = REPO / "models" / "digits32"
image_sample = load_script("scripts/image_sample.py")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the largest delta: no sample ever moves that far


def sample(model, spec, indices, steps=20, scale=2.5):
    """Latents and stats of sample indices (each its own label and noise) in one batch."""
    labels = sample_labels(0, indices, 1000)
    latents, inter = sample_latents(model, labels, steps, scale, mode=parse_mode(spec),
                                    generators=sample_generators(0, indices))
    return latents, inter["stats"]


@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m", "plms"])
def test_delta_zero_is_the_plain_solver_bit_for_bit(solver, tiny_model):
    plain, plain_stats = sample(tiny_model, solver, range(3))
    adaptive, stats = sample(tiny_model, f"{solver}+adaptive:0", range(3))
    assert torch.equal(adaptive, plain)
    assert stats.sample_full_steps == [20] * 3 and stats.sample_shallow_steps == [0] * 3


@pytest.mark.parametrize("interval, branch", [(2, 0), (4, 0), (3, 5)])
def test_no_threshold_and_max_interval_n_is_deepcache_n_bit_for_bit(interval, branch, tiny_model):
    deepcache, dc_stats = sample(tiny_model, f"ddim+deepcache:{interval},branch={branch}", range(3))
    adaptive, stats = sample(tiny_model, f"ddim+adaptive:{FLOAT32_MAX!r},max_interval={interval},branch={branch}",
                             range(3))
    assert torch.equal(adaptive, deepcache)
    full = len(range(0, 20, interval))
    assert stats.sample_full_steps == [full] * 3 and stats.sample_shallow_steps == [20 - full] * 3
    assert (stats.full_passes, stats.shallow_passes) == (dc_stats.full_passes, dc_stats.shallow_passes)


@pytest.fixture(scope="module")
def digits_model():
    return load_model(str(DIGITS / "config.yaml"), str(DIGITS / "model.safetensors"))


@pytest.mark.slow
def test_decisions_are_per_sample_and_independent_of_the_batch(digits_model):
    """On the shipped digits model the samples decide differently: each sample's latents and counts in a batch of
    four are those it gets alone (up to float rounding)."""
    spec = parse_mode("ddim+adaptive:0.1,max_interval=4")
    labels = sample_labels(0, range(4), 10)
    together, inter = sample_latents(digits_model, labels, 10, 2.5, mode=spec, generators=sample_generators(0, range(4)))
    stats = inter["stats"]
    assert len(set(stats.sample_full_steps)) > 1  # the samples took different paths
    for i in range(4):
        alone, own = sample_latents(digits_model, labels[i:i + 1], 10, 2.5, mode=spec,
                                    generators=sample_generators(0, [i]))
        assert rel_err(alone[0], together[i]) < 1e-4
        assert own["stats"].sample_full_steps == [stats.sample_full_steps[i]]
    assert [f + s for f, s in zip(stats.sample_full_steps, stats.sample_shallow_steps)] == [10] * 4


def test_the_change_is_measured_over_both_guidance_rows_of_a_sample(tiny_model):
    """By hand, at the second of two steps of one sample: d = mean|p1 - p0| / mean|p0| over its two rows decides."""
    labels = sample_labels(0, [0], 1000)
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = []
    sample_latents(tiny_model, labels, 2, 2.5, mode=parse_mode("ddim"), x_T=x_T,
                   step_callback=lambda i, t, x, x0: steps.append((int(t), x)))
    cond = tiny_model.get_learned_conditioning({"class_label": labels})
    uncond = tiny_model.get_learned_conditioning({"class_label": torch.full_like(labels, 1000)})
    unet, context, x1 = tiny_model.unet, torch.cat([uncond, cond]), steps[0][1]
    with torch.no_grad():
        p0 = unet.first_block(torch.cat([x_T, x_T]), torch.full((2,), steps[0][0]), context)
        p1 = unet.first_block(torch.cat([x1, x1]), torch.full((2,), steps[1][0]), context)
    d = ((p1 - p0).abs().mean() / p0.abs().mean()).item()
    for delta, full in ((d * 0.99, 2), (d * 1.01, 1)):
        _, inter = sample_latents(tiny_model, labels, 2, 2.5, mode=parse_mode(f"ddim+adaptive:{delta!r}"), x_T=x_T)
        assert inter["stats"].sample_full_steps == [full], (delta, d)


def test_the_input_probe_is_an_option(tiny_model):
    """The probe on the step's input itself: d measured on x, by hand at the second of two steps."""
    labels = sample_labels(0, [0], 1000)
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = []
    sample_latents(tiny_model, labels, 2, 2.5, mode=parse_mode("ddim"), x_T=x_T,
                   step_callback=lambda i, t, x, x0: steps.append(x))
    d = ((steps[0] - x_T).abs().mean() / x_T.abs().mean()).item()
    for delta, full in ((d * 0.99, 2), (d * 1.01, 1)):
        mode = parse_mode(f"ddim+adaptive:{delta!r},probe=input")
        _, inter = sample_latents(tiny_model, labels, 2, 2.5, mode=mode, x_T=x_T)
        assert inter["stats"].sample_full_steps == [full], (delta, d)


def test_mode_strings_labels_and_counted_calls():
    mode = parse_mode("dpmpp2m+adaptive:0.1,max_interval=5@20")
    assert format_mode(mode) == "dpmpp2m+adaptive:0.1,max_interval=5@20"
    assert mode.label == "DPM-Solver++ 2M + DeepCache adaptive 0.1 max 5"
    assert mode.cache.record(20) == {"adaptive": {"adaptive": 0.1, "max_interval": 5, "branch": 0,
                                                  "probe": "first_block"}}
    assert mode.unet_calls(20, 4) == {UNetCall("forward_deep"): 20}  # at most: the costliest schedule
    assert set(AdaptiveDeepCache(0.1).unet_calls(20, 4)) == {UNetCall("forward_deep"), UNetCall("forward_shallow")}


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, message", [
    ("ddim+adaptive:-0.1", "adaptive: expected a number of at least 0 that float32 can hold, not '-0.1'"),
    ("ddim+adaptive:inf", "adaptive: expected a number of at least 0 that float32 can hold, not 'inf'"),
    ("ddim+adaptive:nan", "adaptive: expected a number of at least 0 that float32 can hold, not 'nan'"),
    ("ddim+adaptive:0.1,max_interval=0", "max_interval must be a number of steps of at least 1, not 0"),
    ("ddim+adaptive:0.1,probe=middle", "probe must be one of first_block, input, not 'middle'"),
    ("ddim+fd:uniform:3,adaptive=0.1", "adaptive is an option of 'adaptive', not of ddim\\+fd: adaptive refresh "
                                       "decides at each step while sampling, and FasterDiffusion must know its key "
                                       "steps before it decodes"),
])
def test_bad_modes_are_refused_in_one_line(mode, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_mode(mode)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs", [dict(adaptive=-1.0), dict(adaptive=float("inf")), dict(adaptive=float("nan")),
                                    dict(adaptive=0.1, max_interval=0), dict(adaptive=True)])
def test_bad_plans_are_refused_by_the_library(kwargs):
    with pytest.raises(ValueError):
        AdaptiveDeepCache(**kwargs)


FLAG_CASES = [
    (["--mode", "ddim+fd:uniform:3,adaptive=0.1"], "FasterDiffusion must know its key steps"),
    (["--cache", "fd", "--key_steps", "uniform:3", "--adaptive", "0.1"],
     "--adaptive is a Adaptive DeepCache option: add --cache adaptive (the cache is fd): adaptive refresh"),
    (["--cache", "adaptive", "--adaptive", "-1"], "expected a number of at least 0"),
    (["--cache", "adaptive", "--adaptive", "inf"], "expected a number of at least 0"),
    (["--cache", "adaptive", "--adaptive", "0.1", "--max_interval", "0"], "max_interval must be a number of steps"),
    (["--mode", "ddim+deepcache:3,forecast=3"], "forecast: expected an order of 0, 1 or 2, not '3'"),
    (["--cache", "deepcache", "--cache_interval", "3", "--forecast", "7"], "expected an order of 0, 1 or 2"),
]


@pytest.mark.parametrize("flags, message", FLAG_CASES)
def test_bad_flags_are_one_line_and_exit_2_before_model_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        image_sample.run(["--config_path", str(TINY_CONFIG), "--model_path", str(TINY_CKPT), "--num_samples", "2",
                          "--ddim_steps", "10", "--output_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_batch_sizes_and_processes_give_equal_samples(tmp_path):
    """Two MPI processes with batches of 2 give the samples of one process with a batch of 4, on the shipped digits
    model at a threshold where its samples decide differently (full steps 6, 7, 7, 7 of 10); batch 1 against batch 4
    in one process: test_decisions_are_per_sample_and_independent_of_the_batch."""
    def run(name, *extra, processes=1):
        cmd = [sys.executable, "scripts/image_sample.py", "--config_path", str(DIGITS / "config.yaml"),
               "--model_path", str(DIGITS / "model.safetensors"), "--num_samples", "4", "--ddim_steps", "10",
               "--scale", "2.5", "--tqdm_disable", "yes", "--mode", "ddim+adaptive:0.1,max_interval=4",
               "--save_latents", "--output_dir", str(tmp_path / name), *extra]
        if processes > 1:
            cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(processes), *cmd]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        with np.load(tmp_path / name / "samples_4x32x32x3.npz") as npz:
            return npz["latents"]

    four, mpi = run("four", "--batch_size", "4"), run("mpi", "--batch_size", "2", processes=2)
    assert rel_err(torch.from_numpy(mpi), torch.from_numpy(four)) < 1e-4  # float rounding of other batch shapes
