"""FasterDiffusion: run the UNet encoder at key time-steps only and decode the steps in between in parallel.

A `FasterDiffusion` object is a cache plan handed to a sampler (`cache=`); it holds no tensors and the model
holds no state. Loop indices count sampling steps from the noisiest (0) to the last (S - 1).
"""
import copy
import math
import operator
import re
from collections import Counter

import torch

from ldm.models.diffusion.cache import Cache, Strategy, UNetCall
from ldm.models.diffusion.forecast import FORECAST, TaylorFeatures, check_order
from ldm.models.diffusion.options import Option, boolean, non_negative_float, whole_number
from ldm.models.diffusion.steps import AUTO, check_loop_indices, read_steps

# Key steps of the published FasterDiffusion LDM scripts, for S = 250 (sentinel left out).
PRESETS = {
    # scripts/image_sample.py: 48 encoder passes.
    "ldm250": (0, 1, 2, 3, 4, 5, 10, 15, 25, 35, 55, 75, 85, 95, 96, 97, 98, 99, 110, 125, 135, 140, 145, 146,
               147, 148, 149, 155, 160, 170, 171, 172, 173, 174, 185, 195, 196, 197, 198, 199, 210, 222, 223,
               224, 235, 247, 248, 249),
    # infer_ldm.py: 19 encoder passes.
    "ldm250-fast": (0, 1, 2, 3, 4, 5, 10, 25, 55, 85, 110, 135, 155, 160, 185, 195, 235, 248, 249),
}
PRESET_STEPS = 250
CONTEXT_LAYOUTS = ("paired", "reference")
# Prior noise injection as published: after each update at a timestep below 150, add 0.003 * x_T.
INJECTION_THRESHOLD, INJECTION_SCALE = 150, 0.003


def _preset_key_steps(name, num_steps):
    """Key steps of a preset for num_steps sampling steps.

    "uniform:N" puts a key step at every N-th step. The published presets are defined for 250 steps;
    for other step counts each key index i becomes floor(i * S / 250), duplicates dropped, so the
    encoder runs at the same fractions of the trajectory.
    """
    if name.startswith("@"):
        return tuple(read_steps(name[1:], num_steps, "encoder"))
    if AUTO.fullmatch(name):
        raise ValueError(f"key_steps {name!r} are calibrated on the model: resolve them first with "
                         "ldm.calibration.auto_steps (the scripts do)")
    uniform = re.fullmatch(r"uniform:(\d+)", name)
    if uniform:
        every = int(uniform.group(1))
        if not 1 <= every <= num_steps:
            raise ValueError(f"key_steps {name!r} does not fit {num_steps} steps: N must be in 1..{num_steps}")
        return tuple(range(0, num_steps, every))
    if name not in PRESETS:
        raise ValueError(f"unknown key_steps preset {name!r}; choose one of {', '.join(PRESETS)}, uniform:N "
                         "or a comma-separated list of loop indices")
    return tuple(sorted({math.floor(i * num_steps / PRESET_STEPS) for i in PRESETS[name]}))


def parse_key_steps(spec):
    """A preset name stays a string; '0,5,10' (or a sequence of ints) becomes a tuple of ints."""
    if isinstance(spec, str):
        spec = spec.strip()
        if not re.fullmatch(r"[\d\s,]+", spec):
            return spec
        spec = [s for s in spec.split(",") if s.strip()]
    try:
        steps = tuple(operator.index(s) if not isinstance(s, str) else int(s) for s in spec)
    except (TypeError, ValueError):
        raise ValueError(f"key_steps must be a preset name or a list of integers, not {spec!r}") from None
    return check_loop_indices(steps, "key_steps", "the first step always runs the encoder")


class FasterDiffusion(Cache):
    """Encoder propagation with parallel decoding and prior noise injection.

    key_steps: loop indices where the encoder runs (0 required; the final sentinel S optional), or a
      preset: "ldm250", "ldm250-fast", "uniform:N", or "@FILE.json" (scripts/calibrate.py's choice).
    parallel: decode all steps of a group as one batch (False: one step at a time; same result, noise injection
      included, where the published fork's sequential mode injects none: add noise_injection=False for that).
    noise_injection: after each update at a timestep t < injection_threshold, add injection_scale * x_T.
    context_layout: "paired" decodes each guidance branch with its own class context; "reference"
      reproduces the published fork, whose tiled context mismatches the feature rows in groups of 2+ steps.
    max_decoder_batch: at most this many decoder rows per call (at least one step's rows), to bound memory.
    forecast: 0 decodes every step of a group from its key step's encoder features; m = 1 or 2 forecasts them
      at each step with a Taylor expansion of order m over the key steps so far (`ldm.models.diffusion.forecast`).
      Each step of a group is forecast from key steps at or before the group's own, so a group still decodes in
      parallel (its steps then no longer share features, so a decoder call costs as many whole decoder passes).
    """
    name = "fd"
    title = "FasterDiffusion"
    options = (
        Option("key_steps", str, default="ldm250",
               help="loop indices where the encoder runs: ldm250, ldm250-fast, uniform:N, a list 0,1,2,5, "
                    "@FILE.json (scripts/calibrate.py) or auto:K (calibrated now)"),
        Option("parallel", boolean, help="decode a group's steps as one batch (default true; false: one at a time)"),
        Option("noise_injection", boolean, default=True, help="prior noise injection at timesteps below 150"),
        Option("injection_threshold", non_negative_float,
               help="noise injection at timesteps below this (default 150, as published)"),
        Option("injection_scale", non_negative_float,
               help="weight of x_T added after each update below the threshold (default 0.003, as published)"),
        Option("context_layout", str, default="paired", choices=CONTEXT_LAYOUTS,
               help="class context of the parallel decoder rows ('reference' = the published fork's)"),
        Option("max_decoder_batch", whole_number, help="at most this many decoder rows per call (bounds memory; "
                                                       "same result)"),
        FORECAST,
    )
    main_option = steps_option = "key_steps"
    feature = "encoder"
    record_key = "faster_diffusion"

    def __init__(self, key_steps, parallel=True, noise_injection=True, injection_threshold=INJECTION_THRESHOLD,
                 injection_scale=INJECTION_SCALE, context_layout="paired", max_decoder_batch=None, forecast=0):
        if context_layout not in CONTEXT_LAYOUTS:
            raise ValueError(f"context_layout must be one of {CONTEXT_LAYOUTS}, not {context_layout!r}")
        if max_decoder_batch is not None and max_decoder_batch < 1:
            raise ValueError(f"max_decoder_batch must be a positive number of rows, not {max_decoder_batch}")
        for name, value in (("injection_scale", injection_scale), ("injection_threshold", injection_threshold)):
            if not (isinstance(value, (int, float)) and 0 <= value <= torch.finfo(torch.float32).max):
                raise ValueError(f"{name} must be a number of at least 0 that float32 can hold, not {value!r}")
        self.key_steps = parse_key_steps(key_steps)
        if isinstance(self.key_steps, str) and not re.fullmatch(r"uniform:\d+|auto:\d+|@.+", self.key_steps):
            _preset_key_steps(self.key_steps, PRESET_STEPS)  # unknown names fail now, not at sampling time
        self.parallel = parallel
        self.noise_injection = noise_injection
        self.injection_threshold = injection_threshold
        self.injection_scale = injection_scale
        self.context_layout = context_layout
        self.max_decoder_batch = max_decoder_batch
        self.forecast = check_order(forecast, "FasterDiffusion")

    @classmethod
    def from_options(cls, **options):
        if "key_steps" not in options:
            raise ValueError("cache 'fd' needs key_steps (a preset such as ldm250 or uniform:4, or loop indices)")
        return cls(**options)

    def label(self):
        keys = self.key_steps if isinstance(self.key_steps, str) else ",".join(map(str, self.key_steps))
        forecast = f" forecast {self.forecast}" if self.forecast else ""
        return f"FD{'-ref' if self.context_layout == 'reference' else ''} {keys}{forecast}"

    def steps_for(self, num_steps):
        return self.key_steps_for(num_steps)

    def record(self, num_steps):
        """As recorded since the first version: key steps, context layout and noise injection, and the injection's
        threshold and scale and the forecast where they are not the published ones."""
        keys = self.calibrating() or list(self.key_steps_for(num_steps))  # 'auto:K' as asked, until calibrated
        record = {"key_steps": keys, "context_layout": self.context_layout,
                  "noise_injection": self.noise_injection}
        for option, published in (("injection_scale", INJECTION_SCALE), ("injection_threshold", INJECTION_THRESHOLD),
                                  ("forecast", 0)):
            if getattr(self, option) != published:
                record[option] = getattr(self, option)
        return {self.record_key: record}

    def unet_calls(self, num_steps, rows):
        """The encoder once a group; the decoder once a call, each call holding steps_per_call steps (which share
        the key step's features unless forecast)."""
        calls = Counter()
        shared = not self.forecast
        for start, stop in self.groups(num_steps):
            calls[UNetCall("encode")] += 1
            size = stop - start
            per_call = self.steps_per_call(size, rows)
            calls[UNetCall("decode", per_call, shared=shared)] += size // per_call
            if size % per_call:
                calls[UNetCall("decode", size % per_call, shared=shared)] += 1
        return calls

    def key_steps_for(self, num_steps):
        """The key loop indices for num_steps sampling steps, without the sentinel."""
        if isinstance(self.key_steps, str):
            return _preset_key_steps(self.key_steps, num_steps)
        steps = self.key_steps[:-1] if self.key_steps[-1] == num_steps else self.key_steps
        if steps[-1] >= num_steps:
            raise ValueError(f"key_steps {list(self.key_steps)} go past the last loop index {num_steps - 1} "
                             f"of {num_steps} steps")
        return steps

    def groups(self, num_steps):
        """Loop-index ranges (start, stop): the encoder runs at start, the decoder at every index."""
        keys = self.key_steps_for(num_steps)
        return list(zip(keys, keys[1:] + (num_steps,)))

    def steps_per_call(self, group_size, rows_per_step):
        """How many steps of a group one decoder call handles."""
        if not self.parallel:
            return 1
        if self.max_decoder_batch is None:
            return group_size
        return max(1, min(group_size, self.max_decoder_batch // rows_per_step))

    def at_rows(self, rows_per_step, new_rows_per_step):
        """This plan at new_rows_per_step rows a step with its decoder calls holding as many steps as at
        rows_per_step (max_decoder_batch scaled): the same UNet work per row, so that FLOPs per image counted at
        one batch size hold at another (with a cap, a larger batch fits fewer steps in a call, and the
        convolutions that a call's steps share over their skip features run once a call)."""
        if self.max_decoder_batch is None or not self.parallel:
            return self
        plan = copy.copy(self)
        plan.max_decoder_batch = max(1, self.max_decoder_batch // rows_per_step) * new_rows_per_step
        return plan

    def injects_at(self, timestep):
        return self.noise_injection and timestep < self.injection_threshold

    def bind(self, calls, guidance, timesteps, x_T):
        """The strategy for one sampling run (see `ldm.models.diffusion.cache`)."""
        groups = self.groups(len(timesteps))
        calls.check_splittable(guidance, "FasterDiffusion")
        return _FasterDiffusionRun(self, groups, calls, guidance, timesteps, x_T)


class _FasterDiffusionRun(Strategy):
    """At a key step: the encoder once on that step's x, then the decoder for every step of its group (in
    chunks of steps_per_call steps, decoded when the solver first asks for one of them). In between, the
    solver's x is not used: the group's predictions all come from the key step's features."""

    def __init__(self, plan, groups, calls, guidance, timesteps, x_T):
        self.plan, self.calls, self.guidance, self.timesteps, self.x_T = plan, calls, guidance, timesteps, x_T
        self.group_stop = dict(groups)
        self.pending = None
        self.features = TaylorFeatures(plan.forecast)

    def __call__(self, x, i):
        if i in self.group_stop:
            self.pending = self._decode_group(x, i, self.group_stop[i])
            self.calls.stats.full_passes += 1  # the key step's own prediction sees its x through the encoder
        return self.guidance.combine(next(self.pending))

    def after_step(self, x, i):
        if self.plan.injects_at(self.timesteps[i].item()):
            x = x + self.plan.injection_scale * self.x_T
        return x

    def _decode_group(self, x, start, stop):
        """Noise rows (guidance layout) for loop steps start..stop-1, one step at a time."""
        g, t = self.guidance, self.timesteps
        x_in = g.rows(x)
        rows = len(x_in)
        skips, mid = self.calls.encode(x_in, t[start].expand(rows), g.context)
        if self.plan.forecast:
            self.features.refresh(start, (*skips, mid))
        n = stop - start
        context = group_context(g.context, n, g.guided, self.plan.context_layout)
        per_call = self.plan.steps_per_call(n, rows)
        for first in range(0, n, per_call):
            last = min(first + per_call, n)
            t_rows = t[start + first:start + last].repeat_interleave(rows)
            ctx = context[first * rows:last * rows] if context is not None else None
            if self.plan.forecast:  # each step its own features, step-major as the timesteps
                *skips, mid = self.features.at_steps(range(start + first, start + last))
            yield from self.calls.decode(skips, mid, t_rows, ctx).split(rows)


def group_context(c_in, n, guided, layout):
    """Context rows for n decoded steps, step-major: row j*M + k belongs to feature row k.

    "paired" gives row k its own context. "reference" reproduces the published fork, which stacks
    features as [uncond rows for all steps; cond rows for all steps] but tiles the context as
    [uc; c; uc; c; ...]: its row r = branch*n*B + j*B + b receives c_in[r mod 2B].
    """
    if c_in is None:
        return None
    rows = c_in.shape[0]
    if layout == "paired" or not guided or n == 1:
        return c_in.repeat(n, *([1] * (c_in.dim() - 1)))
    batch = rows // 2
    step = torch.arange(n).repeat_interleave(rows)
    k = torch.arange(rows).repeat(n)
    branch, sample = k // batch, k % batch
    return c_in[(branch * n * batch + step * batch + sample) % rows]
