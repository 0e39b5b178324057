"""What every cache builds on: the `Cache` protocol, counted UNet calls, the run's statistics, and no cache.

A cache plan (`None` or a `Cache`, one module each, listed in `ldm.models.diffusion.caches`) is bound to one
sampling run with `bind_cache(plan, calls, guidance, timesteps, x_T)`, which checks the plan against the run
before any model work and returns a strategy: `strategy(x, i)` gives the guided noise prediction at loop step
i (0 = noisiest) and may reuse earlier work; `strategy.after_step(x, i)` may adjust x once the solver finished
step i. The solvers never know which cache they run with.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ldm.models.diffusion.steps import AUTO, auto_count
from ldm.util import precision_context


@dataclass
class SamplerStats:
    """What the UNet ran during one sampling call; rows count both halves of guidance.

    full_passes: noise predictions made by the whole UNet from the step's own input (every plain step,
      FasterDiffusion's key steps, DeepCache's full steps, PLMS's second evaluation at its first step).
    encoder_passes: calls of the encoder (input and middle blocks).
    decoder_calls, decoder_rows: calls of the whole decoder (output blocks) and the rows they decoded.
    shallow_passes: DeepCache calls that ran only the shallow branch.
    flops: UNet floating-point operations counted by ldm.flops.FlopCounter (with count_flops=True).
    sample_full_steps, sample_shallow_steps: per sample of the batch, the steps it took the whole UNet and the
      shallow branch (caches that decide per sample fill them; empty otherwise).
    """
    steps: int = 0
    full_passes: int = 0
    encoder_passes: int = 0
    decoder_calls: int = 0
    decoder_rows: int = 0
    shallow_passes: int = 0
    flops: int = 0
    sample_full_steps: list = field(default_factory=list)
    sample_shallow_steps: list = field(default_factory=list)


class UNetCalls:
    """The UNet entry points a cache uses, run in the sampling precision and counted in `stats`: as they are when
    the UNet stores its weights in that precision (`ldm.util.store_weights`), else under autocast."""

    def __init__(self, model, precision, stats):
        self.model = model
        self.unet = model.unet
        self.precision = precision
        self.stats = stats
        self._autocast()  # an unusable precision fails here, before any model work

    def _autocast(self):
        return precision_context(self.precision, self.unet, self.model.device)

    def full(self, x, t, context):
        """The whole model, as upstream calls it (`apply_model`)."""
        with self._autocast():
            out = self.model.apply_model(x, t, context)
        self._count_full(len(x))
        return out

    def encode(self, x, t, context):
        with self._autocast():
            features = self.unet.encode(x, t, context)
        self.stats.encoder_passes += 1
        return features

    def decode(self, skips, mid, t, context):
        """Noise in float32, as the whole UNet gives it (so that compiled, the two share the one-step decoder)."""
        with self._autocast():
            out = self.unet.decode(skips, mid, t, context, out_dtype=torch.float32)
        self.stats.decoder_calls += 1
        self.stats.decoder_rows += len(t)
        return out

    def forward_deep(self, x, t, context, branch, first=None):
        """The whole UNet, keeping its deep features; first: input block 0's output on x, if already computed."""
        with self._autocast():
            out, deep = self.unet.forward_deep(x, t, context, branch=branch, first=first)
        self._count_full(len(x))
        return out, deep

    def forward_shallow(self, x, deep, t, context, branch, first=None):
        with self._autocast():
            out = self.unet.forward_shallow(x, deep, t, context, branch=branch, first=first)
        self.stats.shallow_passes += 1
        return out

    def first_block(self, x, t, context):
        """The output of the UNet's first input block (a probe of how far x has moved; not counted as a pass)."""
        with self._autocast():
            return self.unet.first_block(x, t, context)

    def _count_full(self, rows):
        self.stats.full_passes += 1
        self.stats.encoder_passes += 1
        self.stats.decoder_calls += 1
        self.stats.decoder_rows += rows

    def check_splittable(self, guidance, method):
        """Caches that call the UNet's parts pass the context straight to it: cross-attention models only."""
        if self.model.conditioning_key not in ("crossattn", None):
            raise NotImplementedError(f"{method} supports cross-attention conditioning only, "
                                      f"not {self.model.conditioning_key!r}")
        if guidance.context is not None and not torch.is_tensor(guidance.context):
            raise ValueError(f"{method} needs the conditioning as one context tensor, "
                             f"not a {type(guidance.context).__name__}")


class UNetCall(NamedTuple):
    """One kind of UNet call a cache makes (a `UNetCalls` method): decode calls decode `steps` steps of rows at
    once, from one step's encoder features that they share or (shared=False) from features of their own for each
    step; DeepCache's halves take the shallow `branch`."""
    method: str  # "full", "encode", "decode", "forward_deep" or "forward_shallow"
    steps: int = 1
    branch: int = 0
    shared: bool = True


class Cache:
    """The protocol of a cache plan: everything the rest of the tool knows of a cache comes from here.

    A subclass declares its `name` (in mode strings and `--cache`), `title` (in labels and help), `options`
    (`ldm.models.diffusion.options.Option`, from which its flags and mode options are made), `main_option` (the
    one `SOLVER+CACHE:VALUE` sets) and, if it takes calibrated steps, `steps_option` and `feature` (what
    `ldm.calibration` measures). It implements `bind`, and whichever of the methods below differ from these
    defaults. A plan holds no tensors.
    """
    name = None
    title = None
    record_key = None  # the key of its settings in a run's record, if not its name
    options = ()
    main_option = None
    steps_option = None
    feature = None

    @classmethod
    def from_options(cls, **options):
        """The plan of these options (by name); a one-line ValueError for a combination that cannot work."""
        return cls(**options)

    @classmethod
    def main_value(cls, text):
        """The options that `CACHE:VALUE` sets, from VALUE."""
        if cls.main_option is None:
            raise ValueError(f"cache {cls.name!r} takes no value")
        return {cls.main_option: option_named(cls, cls.main_option).read(text)}

    def main_text(self):
        """(VALUE of `CACHE:VALUE` for this plan or None, the options it sets), so that mode strings round-trip."""
        if self.main_option is None:
            return None, ()
        option = option_named(self, self.main_option)
        return option.text(getattr(self, self.main_option)), (self.main_option,)

    def values(self):
        """This plan's options, by name."""
        return {option.name: getattr(self, option.name) for option in self.options}

    def check(self, num_steps):
        """A one-line ValueError if the plan cannot run num_steps steps (steps still to calibrate: if K fits)."""
        pending = self.calibrating()
        if pending:
            auto_count(pending, num_steps)
            return
        self.unet_calls(num_steps, 1)

    def calibrating(self):
        """'auto:K' while the plan's steps are still to be calibrated on the model (`ldm.calibration`), else None."""
        value = getattr(self, self.steps_option, None) if self.steps_option else None
        return value if isinstance(value, str) and AUTO.fullmatch(value) else None

    def with_steps(self, steps):
        """This plan with its steps_option at these loop indices (the steps that 'auto:K' was calibrated to)."""
        return type(self)(**{**self.values(), self.steps_option: list(steps)})

    def check_unet(self, unet):
        """A ValueError (an OptionError names the option) if the plan does not fit this UNet."""

    def label(self):
        """The cache's part of a mode's label, e.g. 'FD uniform:4'."""
        return self.title

    def steps_for(self, num_steps):
        """The loop indices of steps_option at num_steps steps (calibrated specs resolved)."""
        raise NotImplementedError(f"{type(self).__name__} takes no step list")

    def record(self, num_steps):
        """The settings a sampling run records for this plan: {key: value} merged into the run's record."""
        return {self.record_key or self.name: self.values()}

    def unet_calls(self, num_steps, rows):
        """Counter of UNetCall: the UNet calls of num_steps steps at `rows` rows a step (FLOP counting, --compile's
        shapes and --batch_size auto's probe read this)."""
        raise NotImplementedError

    def at_rows(self, rows, new_rows):
        """This plan at new_rows rows a step, making per row the UNet work it makes at `rows` (see Mode.for_counting)."""
        return self

    def bind(self, calls, guidance, timesteps, x_T):
        """The strategy for one sampling run (see the module docstring)."""
        raise NotImplementedError

    def __eq__(self, other):
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self):
        values = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v!r}" for k, v in self.values().items())
        return f"{type(self).__name__}({values})"


def option_named(cache, name):
    """The Option of a cache (class or plan) by name."""
    for option in cache.options:
        if option.name == name:
            return option
    raise KeyError(name)


class NoCache(Cache):
    """No cache: the whole UNet at every step (a mode's cache None)."""
    name = "none"
    title = ""

    def unet_calls(self, num_steps, rows):
        return Counter({UNetCall("full"): num_steps})

    def record(self, num_steps):
        return {}

    def bind(self, calls, guidance, timesteps, x_T):
        return Plain(calls, guidance, timesteps)


class Strategy:
    """Base of a cache's strategy for one run (see the module docstring): x is left as the solver made it."""

    def after_step(self, x, i):
        return x


class Plain(Strategy):
    """No cache: the whole UNet at every step."""

    def __init__(self, calls, guidance, timesteps):
        self.calls, self.guidance, self.timesteps = calls, guidance, timesteps

    def __call__(self, x, i):
        return self.guidance(self.calls.full, x, self.timesteps[i])


def bind_cache(plan, calls, guidance, timesteps, x_T):
    """The strategy of a cache plan (None: plain) for one run; an unusable plan fails here."""
    if plan is None:
        return Plain(calls, guidance, timesteps)
    if not isinstance(plan, Cache):
        raise TypeError(f"cache must be None or a cache plan (ldm.models.diffusion.caches), not {type(plan).__name__}")
    return plan.bind(calls, guidance, timesteps, x_T)
