"""PLMS and DPM-Solver++: upstream golden runs, independent step-by-step checks, caches under every solver,
counting, the callback, and options that must fail before any model work."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import rel_err
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.deepcache import DeepCache
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.solvers import ddim_step

SHAPE = [3, 16, 16]
SOLVERS = {"ddim": (DDIMSampler, {}), "plms": (PLMSSampler, {}), "dpmpp2m": (DPMSolverSampler, {"order": 2}),
           "dpmpp3m": (DPMSolverSampler, {"order": 3})}


def run(model, golden, conds, solver="ddim", steps=10, scale=2.5, rows=slice(None), **kwargs):
    cls, options = SOLVERS[solver]
    cond, uncond = conds[0][rows], conds[1][rows]
    x_T = torch.from_numpy(golden["x_T"])[rows]
    return cls(model).sample(steps, len(x_T), SHAPE, cond, x_T=x_T, unconditional_guidance_scale=scale,
                             unconditional_conditioning=uncond, **{**options, **kwargs})


# --- upstream golden runs -------------------------------------------------------------------------

GOLDEN = ["plms_S10_g2.5", "plms_S20_g1.0", "dpmpp2m_S10_g2.5", "dpmpp2m_S20_g1.0"]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_case(name, tiny_model, solver_golden, golden, conds):
    arrays, spec = solver_golden
    case = spec["cases"][name]
    timesteps = []
    latent, inter = run(tiny_model, golden, conds, "plms" if case["sampler"] == "plms" else "dpmpp2m",
                        case["S"], case["guidance_scale"], step_callback=lambda i, t, x, x0: timesteps.append(t))
    assert rel_err(latent, arrays[case["latent"]]) < 1e-5
    assert rel_err(tiny_model.decode_first_stage(latent), arrays[case["image"]]) < 1e-5
    assert inter["stats"].full_passes == case["nfe"]
    # the UNet's timesteps, exactly: integers for PLMS, DPM-Solver's float32 (t - 1/N) * 1000 for DPM-Solver++
    assert timesteps == sorted(set(case["unet_call_timesteps"]), reverse=True)


def test_golden_cases_differ_by_far_more_than_the_tolerance(solver_golden):
    arrays, spec = solver_golden
    latents = [arrays[spec["cases"][name]["latent"]] for name in GOLDEN]
    assert min(rel_err(a, b) for i, a in enumerate(latents) for b in latents[i + 1:]) > 0.1


def test_dpm_solver_continuous_times(tiny_model, solver_golden, golden, conds):
    """time_uniform: linspace(1, 1/N); logSNR: equal steps in lambda = log(alpha / sigma) between the same ends."""
    _, spec = solver_golden
    times = {}
    for skip_type in ("time_uniform", "logSNR"):
        seen = []
        run(tiny_model, golden, conds, "dpmpp2m", 10, skip_type=skip_type, step_callback=lambda i, t, x, x0: seen.append(t))
        times[skip_type] = np.array(seen) / 1000 + 1e-3
    np.testing.assert_allclose(times["time_uniform"], spec["cases"]["dpmpp2m_S10_g2.5"]["t_continuous"][:-1],
                               rtol=1e-6)
    lambdas = log_snr(tiny_model, np.append(times["logSNR"], 1e-3))
    np.testing.assert_allclose(np.diff(lambdas), (lambdas[-1] - lambdas[0]) / 10, rtol=1e-4)
    assert times["logSNR"][0] == pytest.approx(1.0, abs=1e-6)


def log_alpha(model, t):
    """DPM-Solver's discrete schedule in float64: log(alpha-bar_k) / 2 at t = (k + 1) / N, linear between."""
    ac = model.alphas_cumprod.double().numpy()
    return np.interp(t, (np.arange(len(ac)) + 1) / len(ac), 0.5 * np.log(ac))


def log_snr(model, t):
    la = log_alpha(model, t)
    return la - 0.5 * np.log(1 - np.exp(2 * la))


@pytest.mark.parametrize("order, steps, skip_type, lower_order_final, orders", [
    (2, 8, "time_uniform", True, [1, 2, 2, 2, 2, 2, 2, 1]),
    (3, 6, "logSNR", True, [1, 2, 3, 3, 2, 1]),
    (3, 12, "time_uniform", True, [1, 2] + [3] * 10),
    (3, 6, "time_uniform", False, [1, 2, 3, 3, 3, 3]),
    (1, 4, "logSNR", True, [1, 1, 1, 1]),
])
def test_dpm_solver_steps_by_hand(order, steps, skip_type, lower_order_final, orders, tiny_model, golden, conds):
    """Each update recomputed in float64 from the x and data predictions the callback reports: multistep
    DPM-Solver++ of the given order per step (warm-up first, lower orders last below 10 steps)."""
    seen = []
    latent, _ = run(tiny_model, golden, conds, "dpmpp2m", steps, scale=4.0, rows=slice(1, 2), skip_type=skip_type,
                    order=order, lower_order_final=lower_order_final,
                    step_callback=lambda i, t, x, x0: seen.append((t / 1000 + 1e-3, x.double(), x0.double())))
    t = np.array([s[0] for s in seen] + [1e-3])
    lam, la = log_snr(tiny_model, t), log_alpha(tiny_model, t)
    sigma = np.sqrt(1 - np.exp(2 * la))
    x = torch.from_numpy(golden["x_T"])[1:2].double()
    for i, k in enumerate(orders):
        x0 = [seen[i - j][2] for j in range(k)]  # newest first
        h = lam[i + 1] - lam[i]
        phi1 = np.expm1(-h)
        expected = sigma[i + 1] / sigma[i] * x - np.exp(la[i + 1]) * phi1 * x0[0]
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (x0[0] - x0[1]) / r0
            d1 = d1_0
        if k == 2:
            expected = expected - 0.5 * np.exp(la[i + 1]) * phi1 * d1_0
        if k == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = (x0[1] - x0[2]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1
            expected = expected + np.exp(la[i + 1]) * (phi2 * d1 - (phi2 / h - 0.5) * d2)
        assert rel_err(seen[i][1], expected) < 1e-5, (i, k)
        x = seen[i][1]
    assert torch.equal(latent.double(), x)


def test_plms_by_hand(tiny_model, golden, conds):
    """CompVis PLMS on apply_model, batch 1, guidance 4, 5 steps (improved Euler, then orders 2, 3, 4, 4)."""
    cond, uncond = conds
    model = tiny_model
    x = torch.from_numpy(golden["x_T"])[:1]
    ts = [801, 601, 401, 201, 1]  # range(0, 1000, 1000 // 5) + 1, noisiest first
    a = model.alphas_cumprod

    def eps(x, t):
        e_u, e_c = model.apply_model(torch.cat([x, x]), torch.full((2,), t), torch.cat([uncond[:1], cond[:1]])).chunk(2)
        return e_u + 4.0 * (e_c - e_u)

    def step(x, e, i):
        return ddim_step(x, e, a[ts[i]], a[ts[i + 1]] if i + 1 < len(ts) else a[0])[0]

    old = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            e = eps(x, t)
            if not old:
                e_prime = (e + eps(step(x, e, i), ts[i + 1])) / 2
            elif len(old) == 1:
                e_prime = (3 * e - old[-1]) / 2
            elif len(old) == 2:
                e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
            else:
                e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
            old.append(e)
            x = step(x, e_prime, i)
    latent, inter = run(model, golden, conds, "plms", 5, scale=4.0, rows=slice(0, 1))
    assert rel_err(latent, x) < 1e-5
    assert inter["stats"].full_passes == 6


# --- caches under every solver ----------------------------------------------------------------------

@pytest.mark.parametrize("solver", SOLVERS)
def test_every_step_a_key_step_is_the_plain_solver(solver, tiny_model, golden, conds):
    plain, plain_inter = run(tiny_model, golden, conds, solver)
    fd, fd_inter = run(tiny_model, golden, conds, solver, cache=FasterDiffusion("uniform:1", noise_injection=False))
    assert rel_err(fd, plain) < 1e-6
    assert fd_inter["stats"] == plain_inter["stats"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_deepcache_interval_1_is_the_plain_solver(solver, tiny_model, golden, conds):
    plain, _ = run(tiny_model, golden, conds, solver)
    cached, _ = run(tiny_model, golden, conds, solver, cache=DeepCache(1))
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("solver", ["dpmpp2m", "dpmpp3m"])
@pytest.mark.parametrize("injection", [False, True])
def test_faster_diffusion_parallel_equals_sequential_under_dpm_solver(solver, injection, tiny_model, golden, conds):
    keys = [0, 1, 4, 8]
    parallel, inter = run(tiny_model, golden, conds, solver, cache=FasterDiffusion(keys, noise_injection=injection))
    sequential, _ = run(tiny_model, golden, conds, solver,
                        cache=FasterDiffusion(keys, parallel=False, noise_injection=injection))
    plain, _ = run(tiny_model, golden, conds, solver)
    assert rel_err(parallel, sequential) < 1e-5
    assert rel_err(parallel, plain) > 1e-4
    assert (inter["stats"].encoder_passes, inter["stats"].decoder_rows) == (4, 10 * 4)


def test_noise_injection_under_dpm_solver_follows_the_float_timesteps(tiny_model, golden, conds):
    """S=10 DPM-Solver++ feeds the UNet 99.9 as its only timestep below 150: one injection, after the last
    update, which reuses the key step's features; so the difference is exactly 0.003 x_T."""
    keys = [0, 5]
    without, _ = run(tiny_model, golden, conds, "dpmpp2m", cache=FasterDiffusion(keys, noise_injection=False))
    with_inj, _ = run(tiny_model, golden, conds, "dpmpp2m", cache=FasterDiffusion(keys, noise_injection=True))
    torch.testing.assert_close(with_inj - without, 0.003 * torch.from_numpy(golden["x_T"]), rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("solver, cache", [
    ("plms", None), ("plms", FasterDiffusion([0, 3, 7])), ("dpmpp3m", DeepCache(3)),
    ("dpmpp2m", FasterDiffusion("uniform:4", context_layout="reference")), ("ddim", DeepCache(2, branch=2)),
])
def test_samples_do_not_depend_on_the_batch(solver, cache, tiny_model, golden, conds):
    both, _ = run(tiny_model, golden, conds, solver, cache=cache, scale=3.0)
    alone, _ = run(tiny_model, golden, conds, solver, cache=cache, scale=3.0, rows=slice(1, 2))
    assert rel_err(alone[0], both[1]) < 1e-5


def test_plms_first_step_runs_the_whole_unet_and_leaves_the_cache(tiny_model, golden, conds):
    """PLMS's second evaluation at step 0 (on x' = a DDIM step from x_T, at t_1) is a whole-UNet pass that
    does not refresh DeepCache's features: step 1 reruns the shallow branch against step 0's features."""
    cond, uncond = conds
    unet, a = tiny_model.unet, tiny_model.alphas_cumprod
    c_in = torch.cat([uncond, cond])

    def guided(out):
        e_u, e_c = out.chunk(2)
        return e_u + 2.5 * (e_c - e_u)

    x = torch.from_numpy(golden["x_T"])
    t0, t1 = torch.full((4,), 501), torch.full((4,), 1)
    with torch.no_grad():
        out, deep = unet.forward_deep(torch.cat([x, x]), t0, c_in)
        e0 = guided(out)
        x_trial, _ = ddim_step(x, e0, a[501], a[1])
        e_trial = guided(unet(torch.cat([x_trial, x_trial]), t1, c_in))
        x1, _ = ddim_step(x, (e0 + e_trial) / 2, a[501], a[1])
        e1 = guided(unet.forward_shallow(torch.cat([x1, x1]), deep, t1, c_in))
        x2, _ = ddim_step(x1, (3 * e1 - e0) / 2, a[1], a[0])
    latent, inter = run(tiny_model, golden, conds, "plms", 2, cache=DeepCache(full_steps=[0]))
    assert rel_err(latent, x2) < 1e-6
    stats = inter["stats"]
    assert (stats.full_passes, stats.shallow_passes, stats.encoder_passes) == (2, 1, 2)


def test_plms_with_faster_diffusion_counts_the_extra_pass(tiny_model, golden, conds):
    _, inter = run(tiny_model, golden, conds, "plms", cache=FasterDiffusion([0, 4]))
    stats = inter["stats"]
    assert (stats.full_passes, stats.encoder_passes, stats.decoder_rows) == (3, 3, 10 * 4 + 4)


# --- counting and the callback --------------------------------------------------------------------

def test_flops_are_counted_with_attention(tiny_model, golden, conds):
    """Plain DDIM: S x one guided UNet call, which is PyTorch's own count plus the self-attention matmuls
    (2 * 2 * rows * L^2 * C per layer, L tokens of C channels) that its table misses on CPU."""
    attention = []

    def count(module, args, out):
        rows, tokens, channels = args[0].shape
        attention.append(2 * 2 * rows * tokens ** 2 * channels)

    hooks = [m.attn1.register_forward_hook(count) for m in tiny_model.unet.modules() if hasattr(m, "attn1")]
    cond, uncond = conds
    x = torch.from_numpy(golden["x_T"])
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            tiny_model.apply_model(torch.cat([x, x]), torch.full((4,), 901), torch.cat([uncond, cond]))
    finally:
        for hook in hooks:
            hook.remove()
    assert attention and sum(attention) > 0
    _, inter = run(tiny_model, golden, conds, steps=10, count_flops=True)
    assert inter["stats"].flops == 10 * (counter.get_total_flops() + sum(attention))


def test_flop_counts_follow_the_cache(tiny_model, golden, conds):
    flops = {}
    for name, cache in [("plain", None), ("fd", FasterDiffusion("uniform:5")), ("deepcache", DeepCache(5))]:
        latent, inter = run(tiny_model, golden, conds, steps=10, cache=cache, count_flops=True)
        uncounted, _ = run(tiny_model, golden, conds, steps=10, cache=cache)
        assert torch.equal(latent, uncounted)
        flops[name] = inter["stats"].flops
    assert flops["deepcache"] < flops["fd"] < flops["plain"]
    _, inter = run(tiny_model, golden, conds, steps=10)
    assert inter["stats"].flops == 0


@pytest.mark.parametrize("solver", SOLVERS)
def test_callback_sees_every_step(solver, tiny_model, golden, conds):
    seen = []
    latent, inter = run(tiny_model, golden, conds, solver, steps=10,
                        step_callback=lambda i, t, x, x0: seen.append((i, t, x.clone(), x0)))
    assert [s[0] for s in seen] == list(range(10))
    assert all(a[1] > b[1] for a, b in zip(seen, seen[1:]))
    assert torch.equal(seen[-1][2], latent)
    assert inter["stats"].steps == 10
    assert torch.equal(inter["x_inter"][-1], latent) and len(inter["pred_x0"]) == len(inter["x_inter"])


@pytest.mark.parametrize("solver", SOLVERS)
def test_upstream_callbacks(solver, tiny_model, golden, conds):
    """Upstream's callback(step) and img_callback(pred_x0, step), callback the fifth positional argument as
    upstream; pred_x0 is the one step_callback sees."""
    cls, options = SOLVERS[solver]
    steps, images, seen = [], [], []
    cls(tiny_model).sample(10, 2, SHAPE, conds[0][:2], steps.append, x_T=torch.from_numpy(golden["x_T"])[:2],
                           img_callback=lambda x0, i: images.append((i, x0)),
                           step_callback=lambda i, t, x, x0: seen.append(x0), **options)
    assert steps == list(range(10)) and [i for i, _ in images] == steps
    assert all(x0 is other for (_, x0), other in zip(images, seen))


# --- options that must fail before any model work --------------------------------------------------

@pytest.mark.parametrize("solver, kwargs, error, message", [
    ("dpmpp2m", dict(order=4), ValueError, "order must be one of (1, 2, 3), not 4"),
    ("dpmpp2m", dict(skip_type="quadratic"), ValueError, "unknown DPM-Solver skip_type 'quadratic'"),
    ("dpmpp3m", dict(steps=2), ValueError, "order 3 needs at least 3 steps"),
    ("dpmpp2m", dict(eta=0.5), ValueError, "eta must be 0"),
    ("plms", dict(eta=0.5), ValueError, "eta must be 0"),
    ("plms", dict(cache="fd"), TypeError, "cache must be None or a cache plan (ldm.models.diffusion.caches), not str"),
    ("ddim", dict(faster_diffusion=DeepCache(2)), TypeError, "faster_diffusion takes a FasterDiffusion plan"),
    ("ddim", dict(faster_diffusion=FasterDiffusion([0]), cache=DeepCache(2)), ValueError, "not both"),
    ("dpmpp2m", dict(cache=FasterDiffusion([0, 12])), ValueError, "go past the last loop index 9"),
    ("plms", dict(cache=DeepCache(full_steps=[0, 10])), ValueError, "go past the last loop index 9"),
    ("dpmpp2m", dict(precision="fp16"), ValueError, "fp16 needs a CUDA device"),
    ("plms", dict(quantize_x0=True), NotImplementedError, "quantize_x0=False only"),
])
def test_bad_options_fail_in_one_line_before_model_work(solver, kwargs, error, message, tiny_model, golden, conds):
    calls = []
    hook = tiny_model.unet.input_blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as excinfo:
            run(tiny_model, golden, conds, solver, **kwargs)
    finally:
        hook.remove()
    assert not calls and "\n" not in str(excinfo.value)
