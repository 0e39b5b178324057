"""DeepCache: the UNet's deep/shallow passes, full-step plans, the upstream golden run, equivalences."""
import pytest
import torch

from conftest import rel_err
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.deepcache import DeepCache
from ldm.models.diffusion.solvers import ddim_step

SHAPE = [3, 16, 16]


def ddim(model, golden, conds, steps=20, scale=2.5, cache=None, **kwargs):
    cond, uncond = conds
    return DDIMSampler(model).sample(steps, 2, SHAPE, cond, x_T=torch.from_numpy(golden["x_T"]),
                                     unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                                     cache=cache, **kwargs)


# --- the UNet's DeepCache passes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet_inputs(tiny_model, golden):
    x = torch.from_numpy(golden["x"])
    return x, torch.from_numpy(golden["t"]), torch.from_numpy(golden["cond"])


def test_forward_deep_equals_forward(tiny_model, unet_inputs):
    unet = tiny_model.unet
    with torch.no_grad():
        for branch in (0, 3, 11):
            eps, _ = unet.forward_deep(*unet_inputs, branch=branch)
            assert torch.equal(eps, unet(*unet_inputs))


@pytest.mark.parametrize("branch", [0, 1, 5, 10, 11])
def test_shallow_branch_on_its_own_input_gives_the_whole_unet(branch, tiny_model, unet_inputs):
    """Features cached from the same x and t make the shallow branch recompute exactly the full output."""
    x, t, c = unet_inputs
    unet = tiny_model.unet
    with torch.no_grad():
        eps, deep = unet.forward_deep(x, t, c, branch=branch)
        torch.testing.assert_close(unet.forward_shallow(x, deep, t, c, branch=branch), eps, rtol=1e-6, atol=1e-6)


def test_shallow_branch_is_deepcaches_ldm_definition(tiny_model, unet_inputs):
    """branch 0, by hand with hooks: the output of output_blocks[10] from a full pass, then on a new x and t
    only input_blocks[0] -> output_blocks[11](cat([cached, h0])) -> out (SPEC G.2)."""
    x, t, c = unet_inputs
    unet = tiny_model.unet
    cached = {}
    hook = unet.output_blocks[10].register_forward_hook(lambda m, args, out: cached.update(f=out))
    with torch.no_grad():
        try:
            unet(x, t, c)
        finally:
            hook.remove()
        _, deep = unet.forward_deep(x, t, c)
        x2, t2 = 0.5 * x + 1.0, torch.full_like(t, 123)
        emb = unet.embed_time(t2)
        h0 = unet.input_blocks[0](x2, emb, c)
        expected = unet.out(unet.output_blocks[11](torch.cat([cached["f"], h0], dim=1), emb, c))
        assert torch.equal(deep, cached["f"])
        torch.testing.assert_close(unet.forward_shallow(x2, deep, t2, c), expected, rtol=1e-6, atol=1e-6)


def test_branch_must_fit_the_unet(tiny_model, unet_inputs):
    with pytest.raises(ValueError, match="branch must be in 0..11 for this UNet, not 12"):
        tiny_model.unet.forward_deep(*unet_inputs, branch=12)


# --- plans ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan, steps, expected", [
    (DeepCache(3), 20, [0, 3, 6, 9, 12, 15, 18]),
    (DeepCache(5), 20, [0, 5, 10, 15]),
    (DeepCache(25), 20, [0]),
    (DeepCache(), 4, [0, 1, 2, 3]),
    (DeepCache(full_steps=[0, 2, 9]), 10, [0, 2, 9]),
    # the LDM code's non-uniform rule, values by hand: int32 truncates, np.unique drops repeats
    (DeepCache(3, nonuniform=True), 20, [0, 1, 3, 5, 8, 12, 15]),
    (DeepCache(5, nonuniform=True), 20, [0, 2, 7, 12]),
    (DeepCache(2, nonuniform=True, pow=2.0), 20, [0, 1, 3, 5, 7, 9, 12, 16]),
    (DeepCache(5, nonuniform=True), 250, [0, 1, 3, 5, 7, 10, 13, 15, 19, 22, 25, 29, 33, 37, 41, 45, 49, 53, 58, 63,
                                         68, 72, 77, 83, 88, 93, 99, 104, 110, 116, 122, 127, 134, 140, 146, 152,
                                         159, 165, 172, 178, 185, 192, 199, 206, 213, 220, 227, 235, 242]),
])
def test_full_steps(plan, steps, expected):
    assert list(plan.full_steps_for(steps)) == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(interval=0), "interval must be a positive number of steps, not 0"),
    (dict(interval=-2), "interval must be a positive number of steps"),
    (dict(interval=2.5), "interval must be a positive number of steps"),
    (dict(full_steps=[1, 4]), "full_steps must start with 0"),
    (dict(full_steps=[0, 4, 4]), "strictly increasing"),
    (dict(full_steps=[0, "a"]), "list of integers"),
    (dict(interval=3, full_steps=[0, 3]), "an interval or full_steps, not both"),
    (dict(nonuniform=True), "nonuniform needs an interval"),
    (dict(interval=3, pow=0), "pow must be a positive finite number"),
    (dict(interval=3, pow=float("inf")), "pow must be a positive finite number"),
    (dict(branch=-1), "branch must be a non-negative integer"),
])
def test_invalid_plans(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        DeepCache(**kwargs)
    assert "\n" not in str(error.value)


# --- sampling -------------------------------------------------------------------------------------

def test_upstream_golden_run(tiny_model, solver_golden, conds, golden):
    arrays, spec = solver_golden
    case = spec["cases"]["deepcache_uniform3_S20_g2.5"]
    latent, inter = ddim(tiny_model, golden, conds, steps=case["S"], scale=case["guidance_scale"],
                         cache=DeepCache(case["cache"]["replicate_interval"]))
    assert rel_err(latent, arrays[case["latent"]]) < 1e-5
    assert rel_err(tiny_model.decode_first_stage(latent), arrays[case["image"]]) < 1e-5
    stats = inter["stats"]
    assert stats.full_passes == len(case["cache"]["full_unet_steps"]) == 7
    assert stats.shallow_passes == len(case["cache"]["shallow_steps"]) == 13


@pytest.mark.parametrize("plan", [DeepCache(1), DeepCache(), DeepCache(full_steps=range(10))])
def test_every_step_full_is_plain_ddim_bit_for_bit(plan, tiny_model, golden, conds):
    plain, plain_inter = ddim(tiny_model, golden, conds, steps=10)
    cached, inter = ddim(tiny_model, golden, conds, steps=10, cache=plan)
    assert torch.equal(cached, plain)
    assert inter["stats"] == plain_inter["stats"]


def test_nonuniform_plan_runs_its_full_steps(tiny_model, golden, conds):
    nonuniform, inter = ddim(tiny_model, golden, conds, cache=DeepCache(3, nonuniform=True))
    explicit, _ = ddim(tiny_model, golden, conds, cache=DeepCache(full_steps=[0, 1, 3, 5, 8, 12, 15]))
    uniform, _ = ddim(tiny_model, golden, conds, cache=DeepCache(3))
    assert torch.equal(nonuniform, explicit)
    assert rel_err(nonuniform, uniform) > 1e-4
    assert (inter["stats"].full_passes, inter["stats"].shallow_passes) == (7, 13)


def test_cached_step_by_hand(tiny_model, golden, conds):
    """Two DDIM steps with full steps [0]: the second reruns the shallow branch on its own x against the
    features of the first, guidance rows included."""
    cond, uncond = conds
    unet = tiny_model.unet
    x = torch.from_numpy(golden["x_T"])
    a = tiny_model.alphas_cumprod
    c_in = torch.cat([uncond, cond])

    def guided(out):
        e_u, e_c = out.chunk(2)
        return e_u + 2.5 * (e_c - e_u)

    with torch.no_grad():
        t0, t1 = torch.full((4,), 501), torch.full((4,), 1)
        out, deep = unet.forward_deep(torch.cat([x, x]), t0, c_in)
        x, _ = ddim_step(x, guided(out), a[501], a[1])
        x, _ = ddim_step(x, guided(unet.forward_shallow(torch.cat([x, x]), deep, t1, c_in)), a[1], a[0])
    latent, inter = ddim(tiny_model, golden, conds, steps=2, cache=DeepCache(full_steps=[0]))
    assert rel_err(latent, x) < 1e-6
    assert (inter["stats"].full_passes, inter["stats"].shallow_passes, inter["stats"].decoder_rows) == (1, 1, 4)


def test_deeper_branch_is_closer_to_the_full_unet(tiny_model, golden, conds):
    plain, _ = ddim(tiny_model, golden, conds)
    errors = [rel_err(ddim(tiny_model, golden, conds, cache=DeepCache(4, branch=b))[0], plain) for b in (0, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache=DeepCache(full_steps=[0, 5, 20])), "go past the last loop index 19 of 20 steps"),
    (dict(cache=DeepCache(2, branch=12)), "branch must be in 0..11 for this UNet, not 12"),
])
def test_plans_that_do_not_fit_fail_before_model_work(kwargs, message, tiny_model, golden, conds):
    calls = []
    hook = tiny_model.unet.input_blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message) as error:
            ddim(tiny_model, golden, conds, **kwargs)
    finally:
        hook.remove()
    assert not calls and "\n" not in str(error.value)
