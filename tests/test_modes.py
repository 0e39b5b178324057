"""Sampling modes by name: what front ends build from --sampler/--cache and their options."""
import pytest
import torch

from ldm.models.diffusion.deepcache import DeepCache
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.models.diffusion.modes import Mode, format_mode, make_mode, parse_mode
from ldm.models.diffusion.plms import PLMSSampler
from ldm.sampling import sample_latents


def test_make_mode_builds_the_cache_from_its_options():
    mode = make_mode("dpmpp3m", "fd", key_steps="uniform:4", context_layout="reference", interval=None)
    assert isinstance(mode.cache, FasterDiffusion)
    assert (mode.cache.key_steps, mode.cache.context_layout) == ("uniform:4", "reference")
    assert mode.label == "DPM-Solver++ 3M + FD-ref uniform:4"
    mode = make_mode("plms", "deepcache", interval=5, nonuniform=True, key_steps=None)
    assert isinstance(mode.cache, DeepCache) and mode.cache.full_steps_for(20) == (0, 2, 7, 12)
    assert mode.label == "PLMS + DeepCache N=5 nonuniform"
    assert make_mode().label == "DDIM" and make_mode().cache is None
    assert make_mode("ddim", eta=0.5).label == "DDIM eta 0.5"
    assert make_mode("dpmpp2m", skip_type="logSNR").label == "DPM-Solver++ 2M logSNR"
    assert make_mode("ddim", "deepcache", full_steps=[0, 4], branch=2).label == "DDIM + DeepCache 2 full steps branch 2"
    assert make_mode("ddim", "deepcache", full_steps="@cal.json").label == "DDIM + DeepCache @cal.json"


@pytest.mark.parametrize("spec, label", [
    ("ddim", "DDIM"),
    ("ddim+fd", "DDIM + FD ldm250"),
    ("ddim+fd:uniform:4", "DDIM + FD uniform:4"),
    ("dpmpp2m+deepcache:3", "DPM-Solver++ 2M + DeepCache N=3"),
    ("plms+deepcache", "PLMS + DeepCache N=5"),
    ("dpmpp2m+fd:0,2,5", "DPM-Solver++ 2M + FD 0,2,5"),
])
def test_parse_mode_shares_options_across_modes(spec, label):
    """Shared options go to the caches that take them; skip_type only to DPM-Solver++ modes."""
    mode = parse_mode(spec, key_steps="ldm250", interval=5, skip_type="time_uniform")
    assert mode.label == label


def test_parse_mode_gives_skip_type_to_dpm_solver_only():
    assert parse_mode("dpmpp3m", skip_type="logSNR").skip_type == "logSNR"
    assert parse_mode("plms", skip_type="logSNR").skip_type == "time_uniform"


@pytest.mark.parametrize("build, message", [
    (lambda: make_mode("euler"), "unknown sampler 'euler'; choose one of ddim, plms, dpmpp2m, dpmpp3m"),
    (lambda: make_mode("ddim", "tome"), "unknown cache 'tome'; choose one of none, fd, deepcache"),
    (lambda: make_mode("ddim", "fd"), "cache 'fd' needs key_steps"),
    (lambda: make_mode("ddim", "deepcache", branch=1), "cache 'deepcache' needs an interval"),
    (lambda: make_mode("ddim", "deepcache", interval=0), "interval must be a positive number of steps, not 0"),
    (lambda: make_mode("ddim", "deepcache", key_steps="ldm250"),
     "key_steps is an option of cache 'fd', not of 'deepcache'"),
    (lambda: make_mode("ddim", "none", interval=3), "interval is an option of cache 'deepcache', not of 'none'"),
    (lambda: make_mode("ddim", "fd", key_steps="uniform:4", colour=1), "colour is not a cache option"),
    (lambda: make_mode("plms", eta=1.0), "eta 1.0 needs the ddim sampler"),
    (lambda: make_mode("dpmpp2m", skip_type="karras"), "unknown DPM-Solver skip_type 'karras'"),
    (lambda: make_mode("ddim", skip_type="logSNR"), "DPM-Solver++ options, not ddim's"),
    (lambda: parse_mode("ddim+deepcache:0"), "interval must be a positive number of steps"),
    (lambda: parse_mode("ddim+cache"), "unknown cache 'cache' in mode 'ddim+cache'"),
    (lambda: parse_mode("ddim+fd"), "cache 'fd' needs key_steps"),
    (lambda: parse_mode("ddim:3"), "unknown sampler 'ddim:3'"),
    (lambda: parse_mode("ddim", colour=1), "colour is not an option of any cache"),
    (lambda: Mode("ddim", cache="fd"), "cache must be None or a cache plan (ldm.models.diffusion.caches), not str"),
])
def test_bad_modes_fail_in_one_line(build, message):
    with pytest.raises((ValueError, TypeError)) as error:
        build()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_mode_samples_with_its_solver_and_cache(tiny_model):
    labels = torch.tensor([3, 7])
    mode = make_mode("dpmpp2m", "deepcache", interval=3)
    latents, inter = sample_latents(tiny_model, labels, 10, 2.0, mode=mode)
    cond = tiny_model.get_learned_conditioning({"class_label": labels})
    uncond = tiny_model.get_learned_conditioning({"class_label": torch.full_like(labels, 1000)})
    x_T = inter["x_inter"][0]
    direct, _ = DPMSolverSampler(tiny_model).sample(10, 2, [3, 16, 16], cond, x_T=x_T, unconditional_guidance_scale=2.0,
                                                    unconditional_conditioning=uncond, cache=DeepCache(3))
    assert torch.equal(latents, direct)
    assert (inter["stats"].full_passes, inter["stats"].shallow_passes) == (4, 6)
    plms, _ = sample_latents(tiny_model, labels, 10, 2.0, x_T=x_T, mode=make_mode("plms"))
    assert torch.equal(plms, PLMSSampler(tiny_model).sample(10, 2, [3, 16, 16], cond, x_T=x_T,
                                                            unconditional_guidance_scale=2.0,
                                                            unconditional_conditioning=uncond)[0])
    with pytest.raises(ValueError, match="give eta and the cache in the mode"):
        sample_latents(tiny_model, labels, 10, 2.0, eta=0.5, mode=mode)


def flops_per_image(model, mode, batch_size, steps=10):
    labels = torch.arange(batch_size) % 3
    _, intermediates = sample_latents(model, labels, steps, 3.0, mode=mode, count_flops=True)
    return intermediates["stats"].flops / batch_size


@pytest.mark.parametrize("mode", [
    make_mode("ddim", "fd", key_steps=[0, 4, 9], max_decoder_batch=12), make_mode("ddim", "fd", key_steps=[0, 4, 9]),
    make_mode("dpmpp2m", "deepcache", interval=3), make_mode("plms")])
def test_work_per_image_at_one_batch_size_is_counted_at_another(tiny_model, mode):
    """At 2 images (4 rows a step) a 12-row cap holds 3 steps a call, at 1 image 6: decoder calls that hold more
    steps share more convolutions over their skip features, so FLOPs per image depend on the batch size.
    for_counting keeps the calls' steps, so counting at 1 image gives the work per image at 2; without a cap
    nothing changes."""
    at_two = flops_per_image(tiny_model, mode, 2)
    counted = mode.for_counting(2, guided=True)
    assert flops_per_image(tiny_model, counted, 1) == at_two
    capped = getattr(mode.cache, "max_decoder_batch", None)
    assert (flops_per_image(tiny_model, mode, 1) < at_two) if capped else (counted.cache is mode.cache)
    if capped:
        assert counted.cache.max_decoder_batch == 6 and mode.cache.max_decoder_batch == 12
        # at 4 images a 12-row cap holds 1 step of 8 rows (guided) or 3 of 4 rows: 2 and 3 rows at one image
        assert [mode.for_counting(4, g).cache.max_decoder_batch for g in (True, False)] == [2, 3]


@pytest.mark.parametrize("mode", [
    make_mode(), make_mode("ddim", eta=0.5, steps=50), make_mode("plms", "deepcache", interval=5, nonuniform=True),
    make_mode("dpmpp3m", "fd", key_steps=[0, 3, 7], context_layout="reference", skip_type="logSNR",
              lower_order_final=False, precision="bf16", steps=20),
    make_mode("ddim", "fd", key_steps="uniform:4", noise_injection=False, injection_scale=0.01, max_decoder_batch=64),
    make_mode("dpmpp2m", "deepcache", full_steps=[0], branch=1), make_mode("ddim", "deepcache", full_steps="@cal.json"),
    make_mode("ddim", "fd", key_steps=[0], parallel=False, precision="fp16")])
def test_the_grammar_round_trips(mode):
    spec = format_mode(mode)
    assert parse_mode(spec) == mode and format_mode(parse_mode(spec)) == spec


@pytest.mark.parametrize("spec, message", [
    ("ddim+fd:uniform:4,interval=3", "interval is an option of 'deepcache', not of ddim+fd"),
    ("ddim,skip_type=logSNR", "skip_type is an option of 'dpmpp2m', not of ddim+none"),
    ("ddim+deepcache:3,branch=one", "branch: expected a whole number, not 'one'"),
    ("ddim,precision=fp64", "precision must be one of fp32, bf16, fp16, not 'fp64'"),
    ("ddim+none:3", "a value needs a cache"),
    ("ddim,eta=1,eta=2", "option 'eta' is given twice"),
    ("ddim@7", "7 DDIM steps do not fit"),
])
def test_the_grammar_refuses_in_one_line_naming_the_mode(spec, message):
    with pytest.raises(ValueError) as error:
        parse_mode(spec)
    assert str(error.value).startswith(f"mode {spec!r}") and message in str(error.value)
    assert "\n" not in str(error.value)
