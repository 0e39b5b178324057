"""What every cache strategy builds on: counted UNet calls, the run's statistics, and the plain strategy.

A cache plan (`None`, `FasterDiffusion`, `DeepCache`) is bound to one sampling run with
`bind_cache(plan, calls, guidance, timesteps, x_T)`, which checks the plan against the run before any model
work and returns a strategy: `strategy(x, i)` gives the guided noise prediction at loop step i (0 = noisiest)
and may reuse earlier work; `strategy.after_step(x, i)` may adjust x once the solver finished step i.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ldm.util import precision_context


@dataclass
class SamplerStats:
    """What the UNet ran during one sampling call; rows count both halves of guidance.

    full_passes: noise predictions made by the whole UNet from the step's own input (every plain step,
      FasterDiffusion's key steps, DeepCache's full steps, PLMS's second evaluation at its first step).
    encoder_passes: calls of the encoder (input and middle blocks).
    decoder_calls, decoder_rows: calls of the whole decoder (output blocks) and the rows they decoded.
    shallow_passes: DeepCache calls that ran only the shallow branch.
    flops: UNet floating-point operations counted by torch.utils.flop_counter (with count_flops=True).
    """
    steps: int = 0
    full_passes: int = 0
    encoder_passes: int = 0
    decoder_calls: int = 0
    decoder_rows: int = 0
    shallow_passes: int = 0
    flops: int = 0


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The fused CPU attention kernel that PyTorch's FLOP table leaves out (absent from older PyTorch).
_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@contextmanager
def flop_counter(enabled):
    """FlopCounterMode (yielded) when enabled, else None. Attention is counted on CPU too: there PyTorch's
    scaled-dot-product attention runs a fused kernel that its FLOP table leaves out."""
    if not enabled:
        yield None
        return
    counter = FlopCounterMode(display=False, custom_mapping={_CPU_ATTENTION: _sdpa_flops} if _CPU_ATTENTION else {})
    with counter:
        yield counter


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

    def forward_deep(self, x, t, context, branch):
        with self._autocast():
            out, deep = self.unet.forward_deep(x, t, context, branch=branch)
        self._count_full(len(x))
        return out, deep

    def forward_shallow(self, x, deep, t, context, branch):
        with self._autocast():
            out = self.unet.forward_shallow(x, deep, t, context, branch=branch)
        self.stats.shallow_passes += 1
        return out

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


class Plain:
    """No cache: the whole UNet at every step."""

    def __init__(self, calls, guidance, timesteps):
        self.calls, self.guidance, self.timesteps = calls, guidance, timesteps

    def __call__(self, x, i):
        return self.guidance(self.calls.full, x, self.timesteps[i])

    def after_step(self, x, i):
        return x


def bind_cache(plan, calls, guidance, timesteps, x_T):
    """The strategy of a cache plan (None: plain) for one run; an unusable plan fails here."""
    if plan is None:
        return Plain(calls, guidance, timesteps)
    if not callable(getattr(plan, "bind", None)):
        raise TypeError(f"cache must be None, a FasterDiffusion or a DeepCache, not {type(plan).__name__}")
    return plan.bind(calls, guidance, timesteps, x_T)
