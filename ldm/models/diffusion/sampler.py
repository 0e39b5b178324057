"""What the sampler front ends share: argument checks, the denoiser a solver sees, and one sampling run
(guidance, the cache, counting, the callback and upstream's intermediates)."""
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ldm.flops import FlopCounter
from ldm.models.diffusion.cache import SamplerStats, UNetCalls, bind_cache
from ldm.models.diffusion.guidance import ClassifierFreeGuidance

# Upstream sample() arguments that are accepted at their default values only.
UPSTREAM_DEFAULTS = {"normals_sequence": None, "quantize_x0": False, "mask": None, "x0": None, "temperature": 1.0,
                     "noise_dropout": 0.0, "score_corrector": None, "corrector_kwargs": None}


def check_upstream_arguments(sampler, kwargs):
    """Upstream's optional sample() arguments are accepted at their defaults only; unknown ones are errors."""
    for key, value in kwargs.items():
        if key not in UPSTREAM_DEFAULTS:
            raise TypeError(f"{sampler}.sample got an unexpected argument {key!r}")
        default = UPSTREAM_DEFAULTS[key]
        if not (value is default or (default is not None and not torch.is_tensor(value) and value == default)):
            raise NotImplementedError(f"{sampler}.sample supports {key}={default!r} only, not {value!r}")


def randn(shape, generator=None, device="cpu"):
    """Standard normal noise; with a list of generators, row i is drawn from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def row_count(value):
    """The batch rows of a tensor, or of the first tensor in a dict (a conditioning of several keys)."""
    return len(next(iter(value.values()))) if isinstance(value, dict) else value.shape[0]


class Denoiser:
    """The model as a solver sees it (see `ldm.models.diffusion.solvers`): the cache strategy's prediction
    at each step, an uncached whole-UNet prediction, and the end of each step."""

    def __init__(self, strategy, guidance, calls, timesteps, on_step):
        self.strategy, self.guidance, self.calls, self.timesteps, self.on_step = (
            strategy, guidance, calls, timesteps, on_step)

    def __call__(self, x, i):
        return self.strategy(x, i)

    def uncached(self, x, i):
        return self.guidance(self.calls.full, x, self.timesteps[i])

    def end_step(self, i, x, pred_x0):
        x = self.strategy.after_step(x, i)
        self.on_step(i, x, pred_x0)
        return x


class Sampler:
    """Base of the upstream-style front ends (DDIM, PLMS, DPM-Solver++): a subclass turns its arguments into
    the UNet's timesteps per loop step and a solver call; `run` does the rest."""

    name = "Sampler"

    def __init__(self, model, schedule="linear", **kwargs):
        self.model = model  # `schedule` and extra arguments are accepted for upstream compatibility
        self.ddpm_num_timesteps = model.num_timesteps

    def run(self, solve, timesteps, batch_size, shape, conditioning, x_T=None, unconditional_guidance_scale=1.0,
            unconditional_conditioning=None, cache=None, callback=None, img_callback=None, step_callback=None,
            log_every_t=100, generator=None, precision="fp32", progress=False, count_flops=False):
        """Sample with solve(denoiser, x_T) -> x_0; returns (x_0, intermediates with 'x_inter', 'pred_x0', 'stats').

        timesteps: what the UNet receives at each loop step (a 1-D tensor, noisiest first).
        After every step, with the state the next step starts from: upstream's callback(step) and
        img_callback(pred_x0, step), and step_callback(step, timestep, x, pred_x0).
        """
        model = self.model
        for what, value in (("conditionings", conditioning), ("unconditional conditionings", unconditional_conditioning),
                            ("rows of x_T", x_T)):
            if value is not None and row_count(value) != batch_size:
                raise ValueError(f"got {row_count(value)} {what} for batch size {batch_size}")
        device = model.device
        guidance = ClassifierFreeGuidance(conditioning, unconditional_conditioning, unconditional_guidance_scale)
        stats = SamplerStats()
        calls = UNetCalls(model, precision, stats)
        if x_T is None:
            x_T = randn((batch_size, *shape), generator, device)
        x_T = x_T.to(device=device, dtype=torch.float32)
        timesteps = timesteps.to(device)
        strategy = bind_cache(cache, calls, guidance, timesteps, x_T)

        num_steps = len(timesteps)
        intermediates = {"x_inter": [x_T], "pred_x0": [x_T], "stats": stats}
        bar = tqdm(total=num_steps, desc=self.name, disable=not progress, leave=False)

        def on_step(i, x, pred_x0):
            stats.steps += 1
            index = num_steps - 1 - i
            if index % log_every_t == 0 or index == num_steps - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if step_callback is not None:
                step_callback(i, timesteps[i].item(), x, pred_x0)
            bar.update(1)

        counter = FlopCounter() if count_flops else nullcontext()
        with counter:
            x = solve(Denoiser(strategy, guidance, calls, timesteps, on_step), x_T)
        bar.close()
        if count_flops:
            stats.flops = counter.flops
        return x, intermediates
