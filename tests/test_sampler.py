"""DDIM and FasterDiffusion: golden runs of the upstream code, equivalences, counts, invalid plans."""
import numpy as np
import pytest
import torch

from conftest import rel_err
from ldm.models.diffusion.ddim import DDIMSampler, make_ddim_timesteps
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.faster_diffusion import PRESETS, FasterDiffusion
from ldm.models.diffusion.plms import PLMSSampler
from ldm.sampling import sample_generators

SHAPE = [3, 16, 16]


def run(model, golden, conds, steps=10, scale=3.0, fd=None, guided=True, **kwargs):
    cond, uncond = conds
    x_T = torch.from_numpy(golden["x_T"])
    return DDIMSampler(model).sample(steps, 2, SHAPE, cond, x_T=x_T, unconditional_guidance_scale=scale,
                                     unconditional_conditioning=uncond if guided else None,
                                     faster_diffusion=fd, **kwargs)


def plan_for(case):
    layout = case["context_layout"] if case["context_layout"] in ("paired", "reference") else "paired"
    return FasterDiffusion(case["key_steps"], parallel=case["parallel"], noise_injection=case["noise_injection"],
                           context_layout=layout)


def test_schedule_matches_golden(tiny_model, golden_cases):
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(10)
    assert sampler.ddim_timesteps.tolist() == golden_cases["ddim_timesteps_S10"]
    np.testing.assert_array_equal(sampler.ddim_alphas.numpy(), np.float32(golden_cases["ddim_alphas_S10"]))
    np.testing.assert_array_equal(sampler.ddim_alphas_prev.numpy(), np.float32(golden_cases["ddim_alphas_prev_S10"]))
    assert make_ddim_timesteps(250)[:3].tolist() == [1, 5, 9] and make_ddim_timesteps(250)[-1] == 997


@pytest.mark.parametrize("steps", [3, 7, 300, 333, 400, 0, 1001])
def test_step_count_that_upstream_would_change_is_an_error(steps):
    with pytest.raises(ValueError, match="DDIM steps"):
        make_ddim_timesteps(steps)


@pytest.mark.parametrize("steps", [3, 300, 999, 1000])
def test_step_count_whose_last_timestep_is_past_the_schedule_is_an_error(steps):
    with pytest.raises(ValueError, match="its last timestep would be 1000, past the schedule's last, 999"):
        make_ddim_timesteps(steps)


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 20, 50, 250, 500])
def test_valid_step_counts_give_exactly_that_many_steps(steps):
    assert len(make_ddim_timesteps(steps)) == steps


def test_the_accepted_step_counts_are_the_divisors_of_1000_below_1000():
    accepted = []
    for steps in range(1, 1001):
        try:
            timesteps = make_ddim_timesteps(steps)
        except ValueError:
            continue
        accepted.append(steps)
        assert len(timesteps) == steps and timesteps.min() == 1 and timesteps.max() <= 999
    assert accepted == [s for s in range(1, 1000) if 1000 % s == 0]


CASES = ["ddim_baseline", "ddim_baseline_seq", "fd_parallel_noinj", "fd_parallel_inj", "fd_sequential",
         "fd_parallel_inj_scale6", "fdfix_parallel_noinj", "fdfix_parallel_inj", "fdfix_parallel_inj_scale6", "fd50"]


@pytest.mark.parametrize("name", CASES)
def test_golden_case(name, tiny_model, golden, golden_cases, conds):
    case = golden_cases["cases"][name]
    latent, _ = run(tiny_model, golden, conds, steps=case["S"], scale=case["guidance_scale"], fd=plan_for(case))
    assert rel_err(latent, golden[case["latent"]]) < 1e-5
    if case.get("image") in golden.files:
        assert rel_err(tiny_model.decode_first_stage(latent), golden[case["image"]]) < 1e-5


def test_golden_cases_are_far_apart_compared_with_the_tolerance(golden):
    """The tolerance above separates layouts, injection and plain DDIM (guards the golden tests)."""
    pairs = [("fd_parallel_noinj", "fdfix_parallel_noinj"), ("fd_parallel_noinj", "fd_parallel_inj"),
             ("ddim_baseline", "fdfix_parallel_noinj"), ("fdfix_parallel_noinj", "fdfix_parallel_inj")]
    for a, b in pairs:
        assert rel_err(golden[f"{a}_latent"], golden[f"{b}_latent"]) > 1e-4, (a, b)


def test_plain_ddim_uses_upstream_guidance(tiny_model, golden, conds):
    """First step by hand: e = e_u + s (e_c - e_u), then the DDIM update."""
    cond, uncond = conds
    x = torch.from_numpy(golden["x_T"])
    latent, _ = run(tiny_model, golden, conds, steps=1, scale=3.0)
    t = torch.full((2,), 1, dtype=torch.long)
    e_u, e_c = tiny_model.apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
    e = e_u + 3.0 * (e_c - e_u)
    a, a_prev = tiny_model.alphas_cumprod[1], tiny_model.alphas_cumprod[0]
    expected = a_prev.sqrt() * (x - (1 - a).sqrt() * e) / a.sqrt() + (1 - a_prev).sqrt() * e
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["paired", "reference"])
def test_parallel_equals_sequential_only_for_paired_layout(layout, tiny_model, golden, conds):
    parallel, _ = run(tiny_model, golden, conds, fd=FasterDiffusion([0, 3, 6, 9], context_layout=layout))
    sequential, _ = run(tiny_model, golden, conds, fd=FasterDiffusion([0, 3, 6, 9], parallel=False))
    if layout == "paired":
        assert rel_err(parallel, sequential) < 1e-5
    else:
        assert rel_err(parallel, sequential) > 1e-4


@pytest.mark.parametrize("max_rows", [1, 4, 6, 100])
def test_chunked_decoding_equals_unchunked(max_rows, tiny_model, golden, conds):
    whole, stats = run(tiny_model, golden, conds, fd=FasterDiffusion([0, 4, 9], context_layout="reference"))
    chunked, chunked_stats = run(tiny_model, golden, conds, fd=FasterDiffusion(
        [0, 4, 9], context_layout="reference", max_decoder_batch=max_rows))
    assert rel_err(chunked, whole) < 1e-5
    rows_per_call = max(4, max_rows // 4 * 4)
    assert chunked_stats["stats"].decoder_rows == whole_rows(stats)
    assert chunked_stats["stats"].decoder_calls == sum(-(-n * 4 // rows_per_call) for n in (4, 5, 1))


def whole_rows(intermediates):
    return intermediates["stats"].decoder_rows


def test_every_step_a_key_step_is_plain_ddim(tiny_model, golden, conds):
    plain, plain_stats = run(tiny_model, golden, conds)
    fd, fd_stats = run(tiny_model, golden, conds, fd=FasterDiffusion("uniform:1", noise_injection=False))
    assert rel_err(fd, plain) < 1e-6
    assert fd_stats["stats"] == plain_stats["stats"]


def test_noise_injection_adds_scaled_initial_noise(tiny_model, golden, conds):
    """With S=10, t=101 and t=1 are below the threshold. Both steps reuse the features of key step 5, so
    eps is unchanged and the first injection passes through the last update scaled by sqrt(a_prev / a)."""
    kwargs = dict(key_steps=[0, 5], context_layout="paired")
    without, _ = run(tiny_model, golden, conds, fd=FasterDiffusion(noise_injection=False, **kwargs))
    with_inj, _ = run(tiny_model, golden, conds, fd=FasterDiffusion(noise_injection=True, **kwargs))
    ac = tiny_model.alphas_cumprod.double()
    expected = 0.003 * torch.from_numpy(golden["x_T"]).double() * (1 + (ac[0] / ac[1]).sqrt())
    torch.testing.assert_close((with_inj - without).double(), expected, rtol=1e-3, atol=2e-5)
    sequential, _ = run(tiny_model, golden, conds, fd=FasterDiffusion(noise_injection=True, parallel=False, **kwargs))
    assert rel_err(sequential, with_inj) < 1e-5


@pytest.mark.parametrize("scale, threshold", [(0.01, 150), (0.003, 50), (0.0, 150)])
def test_noise_injection_weight_and_threshold(tiny_model, golden, conds, scale, threshold):
    """As above with another weight, or a threshold of 50, below which only the last update (at t=1) lies: x_T
    is then added once, after the last update, and passes through nothing. Weight 0 injects nothing."""
    kwargs = dict(key_steps=[0, 5], context_layout="paired")
    without, _ = run(tiny_model, golden, conds, fd=FasterDiffusion(noise_injection=False, **kwargs))
    with_inj, _ = run(tiny_model, golden, conds, fd=FasterDiffusion(injection_scale=scale,
                                                                    injection_threshold=threshold, **kwargs))
    ac = tiny_model.alphas_cumprod.double()
    passes = 1 + (ac[0] / ac[1]).sqrt() if threshold > 101 else 1
    expected = scale * torch.from_numpy(golden["x_T"]).double() * passes
    torch.testing.assert_close((with_inj - without).double(), expected, rtol=1e-3, atol=2e-5)


def test_guidance_free_faster_diffusion_runs_and_matches_sequential(tiny_model, golden, conds):
    parallel, stats = run(tiny_model, golden, conds, scale=1.0, guided=False, fd=FasterDiffusion([0, 2, 7]))
    sequential, _ = run(tiny_model, golden, conds, scale=1.0, guided=False, fd=FasterDiffusion([0, 2, 7], parallel=False))
    assert rel_err(parallel, sequential) < 1e-5
    assert stats["stats"].encoder_passes == 3 and stats["stats"].decoder_rows == 10 * 2
    # scale 1 with an unconditional conditioning also makes a single pass per step
    _, unguided = run(tiny_model, golden, conds, scale=1.0, fd=FasterDiffusion([0, 2, 7]))
    assert unguided["stats"].decoder_rows == 10 * 2


@pytest.mark.parametrize("keys, passes", [([0, 1, 2, 5, 8, 10], 5), ([0], 1), ("uniform:3", 4), ([0, 9], 2)])
def test_counts(keys, passes, tiny_model, golden, conds):
    _, inter = run(tiny_model, golden, conds, fd=FasterDiffusion(keys))
    stats = inter["stats"]
    assert stats.encoder_passes == passes
    assert stats.decoder_rows == 10 * 2 * 2  # steps x batch x guidance
    assert stats.steps == 10


def test_eta_noise_comes_from_per_sample_generators(tiny_model, golden, conds):
    """With eta > 0, sample 1 alone gets the same latent as sample 1 inside a batch of two."""
    cond, uncond = conds
    x_T = torch.from_numpy(golden["x_T"])
    sampler = DDIMSampler(tiny_model)
    both, _ = sampler.sample(10, 2, SHAPE, cond, eta=1.0, x_T=x_T, unconditional_guidance_scale=3.0,
                             unconditional_conditioning=uncond, generator=sample_generators(0, [0, 1]))
    alone, _ = sampler.sample(10, 1, SHAPE, cond[1:], eta=1.0, x_T=x_T[1:], unconditional_guidance_scale=3.0,
                              unconditional_conditioning=uncond[1:], generator=sample_generators(0, [1]))
    deterministic, _ = sampler.sample(10, 2, SHAPE, cond, eta=0.0, x_T=x_T, unconditional_guidance_scale=3.0,
                                      unconditional_conditioning=uncond)
    # batch 1 and batch 2 take other kernel blockings (AVX2 against AVX-512): equal up to float error as a whole,
    # not element by element
    assert rel_err(alone[0], both[1]) < 1e-5
    assert rel_err(both, deterministic) > 1e-3


def test_bf16_is_close_to_fp32(tiny_model, golden, conds):
    fp32, _ = run(tiny_model, golden, conds, fd=FasterDiffusion("uniform:3"))
    bf16, _ = run(tiny_model, golden, conds, fd=FasterDiffusion("uniform:3"), precision="bf16")
    assert bf16.dtype == torch.float32
    assert 0 < rel_err(bf16, fp32) < 0.05


def test_fp16_needs_a_gpu(tiny_model, golden, conds):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        run(tiny_model, golden, conds, precision="fp16")


# --- key-step plans ---------------------------------------------------------------------------

def test_presets_reproduce_the_published_scripts():
    assert len(FasterDiffusion("ldm250").key_steps_for(250)) == 48
    assert len(FasterDiffusion("ldm250-fast").key_steps_for(250)) == 19
    groups = FasterDiffusion("ldm250").groups(250)
    assert max(b - a for a, b in groups) == 20 and groups[-1] == (249, 250)
    sizes = [b - a for a, b in FasterDiffusion("ldm250-fast").groups(250)]
    assert sizes == [1, 1, 1, 1, 1, 5, 15, 30, 30, 25, 25, 20, 5, 25, 10, 40, 13, 1, 1]


def test_presets_rescale_to_other_step_counts():
    keys = FasterDiffusion("ldm250").key_steps_for(50)
    assert keys == tuple(sorted({i * 50 // 250 for i in PRESETS["ldm250"]}))
    assert keys[0] == 0 and keys[-1] == 49
    assert FasterDiffusion("uniform:4").key_steps_for(20) == (0, 4, 8, 12, 16)


def test_sentinel_is_optional():
    assert FasterDiffusion([0, 3, 6, 10]).groups(10) == FasterDiffusion([0, 3, 6]).groups(10) == [(0, 3), (3, 6), (6, 10)]
    assert FasterDiffusion("0, 3,6").key_steps == (0, 3, 6)


@pytest.mark.parametrize("keys, message", [
    ([1, 3, 5], "must start with 0"),
    ([], "must start with 0"),
    ([0, 5, 3], "strictly increasing"),
    ([0, 3, 3], "strictly increasing"),
    ("ldm999", "unknown key_steps preset"),
    ("0,a,3", "unknown key_steps preset"),
    ([0, 2.5], "list of integers"),
])
def test_invalid_key_steps(keys, message):
    with pytest.raises(ValueError, match=message):
        FasterDiffusion(keys)


@pytest.mark.parametrize("keys, steps, message", [
    ([0, 5, 12], 10, "go past the last loop index 9"),
    ([0, 10, 11], 10, "go past the last loop index 9"),
    ("uniform:0", 10, "does not fit 10 steps"),
    ("uniform:11", 10, "does not fit 10 steps"),
])
def test_key_steps_that_do_not_fit_the_step_count(keys, steps, message, tiny_model, golden, conds):
    with pytest.raises(ValueError, match=message):
        run(tiny_model, golden, conds, steps=steps, fd=FasterDiffusion(keys))


@pytest.mark.parametrize("kwargs, message", [
    (dict(context_layout="tiled"), "context_layout"), (dict(max_decoder_batch=0), "max_decoder_batch")])
def test_invalid_plan_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FasterDiffusion([0], **kwargs)


@pytest.mark.parametrize("solver", [DDIMSampler, PLMSSampler, DPMSolverSampler])
def test_batch_rows_must_match(solver, tiny_model, conds):
    """Conditionings and x_T of another batch size: one clear error before any model work."""
    c, uc = conds[0][:2], conds[1][:2]
    with pytest.raises(ValueError, match="got 2 conditionings for batch size 3"):
        solver(tiny_model).sample(10, 3, SHAPE, c)
    with pytest.raises(ValueError, match="got 1 unconditional conditionings for batch size 2"):
        solver(tiny_model).sample(10, 2, SHAPE, c, unconditional_guidance_scale=2.0, unconditional_conditioning=uc[:1])
    with pytest.raises(ValueError, match="got 3 rows of x_T for batch size 2"):
        solver(tiny_model).sample(10, 2, SHAPE, c, x_T=torch.randn(3, *SHAPE))


def test_channels_last_keeps_fp32_results(golden, golden_cases, conds):
    from conftest import TINY_CKPT, TINY_CONFIG
    from ldm.util import load_model, optimize_for_inference
    model = optimize_for_inference(load_model(str(TINY_CONFIG), str(TINY_CKPT)), channels_last=True)
    assert model.model.diffusion_model.input_blocks[1][0].in_layers[2].weight.is_contiguous(
        memory_format=torch.channels_last)
    for name in ("ddim_baseline", "fdfix_parallel_inj_scale6", "fd_parallel_inj"):
        case = golden_cases["cases"][name]
        latent, _ = run(model, golden, conds, steps=case["S"], scale=case["guidance_scale"], fd=plan_for(case))
        assert rel_err(latent, golden[case["latent"]]) < 1e-5, name


def test_upstream_arguments_at_their_defaults_are_accepted(tiny_model, golden, conds):
    plain, _ = run(tiny_model, golden, conds, steps=2)
    same, _ = run(tiny_model, golden, conds, steps=2, temperature=1.0, noise_dropout=0.0, mask=None, x0=None,
                  quantize_x0=False, score_corrector=None, corrector_kwargs=None, normals_sequence=None)
    assert torch.equal(plain, same)
    with pytest.raises(NotImplementedError, match="temperature=1.0 only, not 0.5"):
        run(tiny_model, golden, conds, steps=2, temperature=0.5)
    with pytest.raises(NotImplementedError, match="mask=None only"):
        run(tiny_model, golden, conds, steps=2, mask=torch.ones(2, 3, 16, 16))
    with pytest.raises(TypeError, match="unexpected argument 'guidance'"):
        run(tiny_model, golden, conds, steps=2, guidance=3.0)
