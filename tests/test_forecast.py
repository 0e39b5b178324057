"""Forecast caches (TaylorSeer's expansion over refreshes): the factors, the features each cache hands the UNet,
sampling with them, and the option's checks."""
import math

import pytest
import torch

from conftest import rel_err
from ldm.models.diffusion.cache import SamplerStats, UNetCall
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.deepcache import DeepCache
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.models.diffusion.forecast import TaylorFeatures
from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.models.diffusion.modes import format_mode, parse_mode

SHAPE = [3, 16, 16]
A, B, C = 3.0, -2.0, 0.5  # a feature A + B i + C i^2, exact in float64 at these indices


def feature(i, order):
    """A feature map whose every element is a polynomial of the given order in the loop index i."""
    base = torch.arange(6, dtype=torch.float64).reshape(1, 6)
    return base * A + B * i + (C * i * i if order == 2 else 0.0)


def taylorseer(refreshes, values, order, i):
    """TaylorSeer's forecast at i by its definition, on scalars: factors updated at each refresh in turn."""
    factors, at = [], None
    for a, f in zip(refreshes, values):
        new = [f]
        for k in range(min(order, len(factors))):
            new.append((new[k] - factors[k]) / (a - at))
        factors, at = new, a
    return sum(d * (i - at) ** k / math.factorial(k) for k, d in enumerate(factors))


# --- the factors ----------------------------------------------------------------------------------

def test_order_zero_hands_back_the_stored_tensor():
    features = TaylorFeatures(0)
    stored = torch.randn(2, 3)
    features.refresh(0, stored)
    features.refresh(4, stored + 1)
    assert features.at_step(7)[0] is features.factors[0][0]
    assert len(features.factors) == 1


@pytest.mark.parametrize("order", [1, 2])
def test_a_linear_feature_is_forecast_exactly(order):
    """From the second refresh on, once D_1 is defined (before it, the first refresh's feature is reused)."""
    features = TaylorFeatures(order)
    for n, a in enumerate((0, 3, 5, 9)):
        features.refresh(a, feature(a, 1))
        for i in range(a, a + 6):
            assert torch.equal(features.at_step(i)[0], feature(i, 1)) == (n > 0 or i == a), (a, i)


def test_factors_appear_one_refresh_at_a_time():
    features = TaylorFeatures(2)
    counts = []
    for a in (0, 2, 4, 6):
        features.refresh(a, feature(a, 2))
        counts.append(len(features.factors))
    assert counts == [1, 2, 3, 3]


@pytest.mark.parametrize("refreshes", [(0, 3, 6, 9), (0, 1, 5, 7)])
def test_order_two_follows_taylorseers_definition(refreshes):
    features = TaylorFeatures(2)
    for n, a in enumerate(refreshes):
        features.refresh(a, feature(a, 2))
        for i in range(a, a + 5):
            expected = [taylorseer(refreshes[:n + 1], [feature(r, 2)[0, j].item() for r in refreshes[:n + 1]], 2, i)
                        for j in range(6)]
            torch.testing.assert_close(features.at_step(i)[0][0], torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-12, atol=1e-12)


def test_a_quadratic_is_off_by_the_backward_difference():
    """Refreshes every h steps: the slope D_1 is that of the middle of the last interval, so F = C i^2 is forecast
    s steps after the refresh at a with the error -C h s (the curvature term itself is exact: D_2 = 2C)."""
    h, features = 3, TaylorFeatures(2)
    for a in (0, 3, 6):
        features.refresh(a, feature(a, 2))
    assert torch.equal(features.factors[2][0], torch.full((1, 6), 2 * C, dtype=torch.float64))
    for s in range(5):
        error = features.at_step(6 + s)[0] - feature(6 + s, 2)
        torch.testing.assert_close(error, torch.full((1, 6), -C * h * s, dtype=torch.float64))


def test_steps_are_stacked_step_major():
    features = TaylorFeatures(1)
    features.refresh(0, [feature(0, 1), feature(0, 1) * 2])
    features.refresh(2, [feature(2, 1), feature(2, 1) * 2])
    first, second = features.at_steps([2, 3, 4])
    assert torch.equal(first, torch.cat([feature(i, 1) for i in (2, 3, 4)]))
    assert torch.equal(second, torch.cat([2 * feature(i, 1) for i in (2, 3, 4)]))


# --- what the caches hand the UNet ----------------------------------------------------------------

class FeatureCalls:
    """UNetCalls whose features are polynomials in the loop index (= the timestep here) and whose noise is zero;
    records the features each step's prediction was made from."""

    def __init__(self, order):
        self.order, self.seen, self.stats = order, {}, SamplerStats()
        self.unet = self  # check_branch below

    def check_branch(self, branch):
        pass

    def check_splittable(self, guidance, method):
        pass

    def forward_deep(self, x, t, context, branch):
        self.seen[int(t[0])] = "full"
        return torch.zeros_like(x), feature(int(t[0]), self.order).expand(len(x), 6)

    def forward_shallow(self, x, deep, t, context, branch):
        self.seen[int(t[0])] = deep
        return torch.zeros_like(x)

    def encode(self, x, t, context):
        f = feature(int(t[0]), self.order).expand(len(x), 6)
        return [f, 2 * f], 3 * f

    def decode(self, skips, mid, t, context):
        """Two rows a step (the batch below): shared features have two rows, forecast ones two rows a step."""
        for j in range(len(t) // 2):
            rows = slice(0, 2) if len(mid) == 2 else slice(2 * j, 2 * j + 2)
            self.seen[int(t[2 * j])] = tuple(f[rows] for f in (*skips, mid))
        return torch.zeros(len(t), 1)


def run_strategy(cache, order, steps=12):
    calls = FeatureCalls(order)
    guidance = ClassifierFreeGuidance(None)
    strategy = cache.bind(calls, guidance, torch.arange(steps), torch.zeros(2, 1))
    x = torch.zeros(2, 1)
    for i in range(steps):
        strategy(x, i)
    return calls.seen


@pytest.mark.parametrize("order", [1, 2])
def test_deepcache_forecasts_a_linear_deep_feature_exactly(order):
    seen = run_strategy(DeepCache(3, forecast=order), 1)
    for i, deep in seen.items():
        if i > 3 and i % 3:  # from the second full step on
            assert torch.equal(deep, feature(i, 1).expand(2, 6)), i


def test_deepcache_without_forecast_reuses_the_last_full_steps_tensor():
    calls = FeatureCalls(1)
    strategy = DeepCache(4).bind(calls, ClassifierFreeGuidance(None), torch.arange(8), torch.zeros(2, 1))
    handed = []
    calls.forward_shallow = lambda x, deep, t, context, branch: handed.append(deep) or torch.zeros_like(x)
    deep_at = {}
    forward_deep = calls.forward_deep
    calls.forward_deep = lambda *args: deep_at.setdefault(len(deep_at), forward_deep(*args))
    for i in range(8):
        strategy(torch.zeros(2, 1), i)
    assert all(h is deep_at[0][1] for h in handed[:3]) and all(h is deep_at[1][1] for h in handed[3:])


@pytest.mark.parametrize("order, parallel", [(1, True), (2, True), (1, False), (2, False)])
def test_faster_diffusion_forecasts_linear_encoder_features_exactly(order, parallel):
    seen = run_strategy(FasterDiffusion("uniform:4", parallel=parallel, noise_injection=False, forecast=order), 1)
    assert sorted(seen) == list(range(12))
    for i, (skip0, skip1, mid) in seen.items():
        if i in (1, 2, 3):  # the first group: the first key step's features alone
            assert torch.equal(mid, 3 * feature(0, 1).expand(2, 6))
            continue
        f = feature(i, 1).expand(2, 6)
        assert torch.equal(skip0, f) and torch.equal(skip1, 2 * f) and torch.equal(mid, 3 * f), i


def test_faster_diffusion_forecasts_from_key_steps_at_or_before_the_group():
    """The steps of group [8, 12) are forecast from the key steps 0, 4 and 8 only, the values the factors give then."""
    seen = run_strategy(FasterDiffusion("uniform:4", noise_injection=False, forecast=2), 2)
    for i in range(8, 12):
        expected = taylorseer([0, 4, 8], [feature(a, 2)[0, 1].item() for a in (0, 4, 8)], 2, i)
        assert seen[i][0][0, 1].item() == pytest.approx(expected, abs=1e-12)


def test_forecast_decoder_calls_have_features_of_their_own():
    shared = FasterDiffusion("uniform:4").unet_calls(12, 2)
    forecast = FasterDiffusion("uniform:4", forecast=1).unet_calls(12, 2)
    assert shared == {UNetCall("encode"): 3, UNetCall("decode", 4): 3}
    assert forecast == {UNetCall("encode"): 3, UNetCall("decode", 4, shared=False): 3}
    assert DeepCache(3, forecast=2).unet_calls(12, 2) == DeepCache(3).unet_calls(12, 2)


# --- sampling -------------------------------------------------------------------------------------

def ddim(model, golden, conds, cache, steps=20):
    cond, uncond = conds
    return DDIMSampler(model).sample(steps, 2, SHAPE, cond, x_T=torch.from_numpy(golden["x_T"]),
                                     unconditional_guidance_scale=2.5, unconditional_conditioning=uncond,
                                     cache=cache)[0]


@pytest.mark.parametrize("plan, spec", [(FasterDiffusion("uniform:3"), "fd:uniform:3"), (DeepCache(3), "deepcache:3")])
def test_forecast_zero_is_the_cache_itself_bit_for_bit(plan, spec, tiny_model, golden, conds):
    explicit = type(plan)(**{**plan.values(), "forecast": 0})
    assert explicit == plan and format_mode(parse_mode(f"ddim+{spec},forecast=0")) == f"ddim+{spec}"
    assert torch.equal(ddim(tiny_model, golden, conds, explicit), ddim(tiny_model, golden, conds, plan))


@pytest.mark.parametrize("order", [1, 2])
def test_parallel_faster_diffusion_with_forecast_equals_sequential(order, tiny_model, golden, conds):
    parallel = ddim(tiny_model, golden, conds, FasterDiffusion("uniform:4", forecast=order))
    sequential = ddim(tiny_model, golden, conds, FasterDiffusion("uniform:4", forecast=order, parallel=False))
    capped = ddim(tiny_model, golden, conds, FasterDiffusion("uniform:4", forecast=order, max_decoder_batch=8))
    reuse = ddim(tiny_model, golden, conds, FasterDiffusion("uniform:4"))
    assert rel_err(parallel, sequential) < 1e-5 and rel_err(parallel, capped) < 1e-5
    assert rel_err(parallel, reuse) > 1e-4  # the forecast changes the samples


@pytest.mark.parametrize("cache", ["fd:uniform:4", "deepcache:4"])
def test_forecast_brings_the_cache_closer_to_the_solver_on_the_tiny_model(cache, tiny_model, golden, conds):
    """Not a law, a property of this model at these settings: a sanity check that the forecast is applied where
    it helps, measured against 20-step DDIM from the same noise."""
    plain = ddim(tiny_model, golden, conds, None)
    errors = [rel_err(ddim(tiny_model, golden, conds, parse_mode(f"ddim+{cache},forecast={m}").cache), plain)
              for m in (0, 1)]
    assert errors[1] < errors[0]


# --- the option -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, message", [
    ("ddim+deepcache:3,forecast=3", "forecast: expected an order of 0, 1 or 2, not '3'"),
    ("ddim+fd:uniform:3,forecast=-1", "forecast: expected an order of 0, 1 or 2, not '-1'"),
    ("ddim+fd:uniform:3,forecast=1.5", "forecast: expected an order of 0, 1 or 2, not '1.5'"),
])
def test_bad_orders_are_refused_in_one_line(mode, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_mode(mode)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("cls", [FasterDiffusion, DeepCache])
def test_bad_orders_are_refused_by_the_library(cls):
    args = ("uniform:3",) if cls is FasterDiffusion else (3,)
    for order in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match=r"forecast must be an order of 0, 1 or 2"):
            cls(*args, forecast=order)


def test_mode_strings_labels_and_records_name_the_forecast():
    mode = parse_mode("dpmpp2m+deepcache:5,forecast=2@20")
    assert format_mode(mode) == "dpmpp2m+deepcache:5,forecast=2@20"
    assert mode.label == "DPM-Solver++ 2M + DeepCache N=5 forecast 2"
    assert mode.cache.record(20) == {"deepcache": {"full_steps": [0, 5, 10, 15], "branch": 0, "forecast": 2}}
    assert DeepCache(5).record(20) == {"deepcache": {"full_steps": [0, 5, 10, 15], "branch": 0}}
    fd = parse_mode("ddim+fd:uniform:5,forecast=1").cache
    assert fd.label() == "FD uniform:5 forecast 1" and fd.record(20)["faster_diffusion"]["forecast"] == 1
    assert "forecast" not in FasterDiffusion("uniform:5").record(20)["faster_diffusion"]
