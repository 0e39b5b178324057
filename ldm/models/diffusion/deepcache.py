"""DeepCache: run the whole UNet at full steps only; in between, rerun only its shallow branch on the
current x and reuse the deep decoder features of the last full step.

A `DeepCache` object is a cache plan handed to a sampler (`cache=`); it holds no tensors. Loop indices
count sampling steps from the noisiest (0) to the last (S - 1).
"""
import functools
import math
import operator
from collections import Counter

import numpy as np

from ldm.models.diffusion.cache import Cache, Strategy, UNetCall
from ldm.models.diffusion.forecast import FORECAST, TaylorFeatures, check_order
from ldm.models.diffusion.options import Option, OptionError, boolean, number, step_list, whole_number
from ldm.models.diffusion.steps import AUTO, check_loop_indices, is_calibrated, read_steps


def _loop_indices(steps, name):
    try:
        steps = tuple(operator.index(s) for s in steps)
    except TypeError:
        raise ValueError(f"DeepCache {name} must be a list of integers, not {steps!r}") from None
    return check_loop_indices(steps, f"DeepCache {name}", "the first step runs the whole UNet")


class DeepCache(Cache):
    """Which steps run the whole UNet, and how much of it the other steps rerun.

    interval: N, full steps range(0, S, N); None (and no full_steps): every step is a full step.
    nonuniform: with interval N, at most ceil(S / N) full steps packed towards the start as in DeepCache's LDM
      code: np.unique(np.int32(np.linspace(0, S ** (1 / pow), ceil(S / N) + 1) ** pow))[:-1] (points that
      round to the same step count once).
    full_steps: an explicit list of full steps (loop indices, starting with 0) instead of an interval, or
      "@FILE.json" (scripts/calibrate.py's choice).
    branch: the shallow branch reruns input blocks 0..branch and the last branch + 1 output blocks; 0 is
      DeepCache's LDM setting (the first convolution and the last output block), larger is slower and closer
      to the full UNet.
    forecast: 0 reuses the deep features of the last full step; m = 1 or 2 forecasts them at each shallow step
      with a Taylor expansion of order m over the full steps so far (`ldm.models.diffusion.forecast`).
    """
    name = "deepcache"
    title = "DeepCache"
    options = (
        Option("interval", whole_number, flag="cache_interval", help="a full UNet pass every N steps"),
        Option("nonuniform", boolean, help="with an interval: full steps packed towards the start"),
        Option("pow", number, help="with nonuniform: the power of the packing (1.5)"),
        Option("full_steps", step_list, help="explicit full steps instead of an interval: 0,3,8, @FILE.json or auto:K"),
        Option("branch", whole_number, help="shallow branch depth (0 = DeepCache's LDM setting)"),
        FORECAST,
    )
    main_option = "interval"
    steps_option = "full_steps"
    feature = "deep"

    def __init__(self, interval=None, nonuniform=False, pow=1.5, full_steps=None, branch=0, forecast=0):
        if interval is not None:
            if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
                raise ValueError(f"DeepCache interval must be a positive number of steps, not {interval!r}")
            if full_steps is not None:
                raise ValueError("DeepCache takes an interval or full_steps, not both")
        if nonuniform and interval is None:
            raise ValueError("DeepCache nonuniform needs an interval (it places up to ceil(S / interval) full steps)")
        if not (isinstance(pow, (int, float)) and 0 < pow < math.inf):
            raise ValueError(f"DeepCache pow must be a positive finite number, not {pow!r}")
        if isinstance(branch, bool) or not isinstance(branch, (int, np.integer)) or branch < 0:
            raise ValueError(f"DeepCache branch must be a non-negative integer, not {branch!r}")
        self.interval = None if interval is None else int(interval)
        self.nonuniform = bool(nonuniform)
        self.pow = pow
        calibrated = is_calibrated(full_steps)
        self.full_steps = full_steps if calibrated or full_steps is None else _loop_indices(full_steps, "full_steps")
        self.branch = int(branch)
        self.forecast = check_order(forecast, "DeepCache")

    @classmethod
    def from_options(cls, **options):
        if "interval" not in options and "full_steps" not in options:
            raise ValueError("cache 'deepcache' needs an interval (a full step every N steps) or full_steps")
        return cls(**options)

    @classmethod
    def main_value(cls, text):
        """deepcache:N is an interval; deepcache:0,3,8, :@FILE.json or :auto:K full steps."""
        if text.isdigit():
            return {"interval": int(text)}
        return {"full_steps": step_list(text)}

    def main_text(self):
        if self.interval is not None:
            return str(self.interval), ("interval",)
        if isinstance(self.full_steps, tuple):  # a trailing comma keeps one full step from reading as an interval
            return ",".join(map(str, self.full_steps)) + ("," if len(self.full_steps) == 1 else ""), ("full_steps",)
        if self.full_steps is not None:
            return self.full_steps, ("full_steps",)
        return None, ()

    def label(self):
        if isinstance(self.full_steps, str):  # @calibration.json
            label = f"DeepCache {self.full_steps}"
        elif self.full_steps is not None:
            label = f"DeepCache {len(self.full_steps)} full steps"
        else:
            label = f"DeepCache N={self.interval}{' nonuniform' if self.nonuniform else ''}"
        return label + (f" branch {self.branch}" if self.branch else "") + (
            f" forecast {self.forecast}" if self.forecast else "")

    def check_unet(self, unet):
        try:
            unet.check_branch(self.branch)
        except ValueError as e:
            raise OptionError("branch", str(e)) from None

    def steps_for(self, num_steps):
        return self.full_steps_for(num_steps)

    def record(self, num_steps):
        full = self.calibrating() or list(self.full_steps_for(num_steps))  # 'auto:K' as asked, until calibrated
        record = {"full_steps": full, "branch": self.branch}
        if self.forecast:  # recorded only when used, so that earlier runs' records still match
            record["forecast"] = self.forecast
        return {self.name: record}

    def unet_calls(self, num_steps, rows):
        """The whole UNet (keeping its deep features) at full steps, the shallow branch at the others."""
        full = len(self.full_steps_for(num_steps))
        return +Counter({UNetCall("forward_deep", branch=self.branch): full,
                         UNetCall("forward_shallow", branch=self.branch): num_steps - full})

    def full_steps_for(self, num_steps):
        """The loop indices where the whole UNet runs, for num_steps sampling steps."""
        if isinstance(self.full_steps, str) and AUTO.fullmatch(self.full_steps):
            raise ValueError(f"full_steps {self.full_steps!r} are calibrated on the model: resolve them first with "
                             "ldm.calibration.auto_steps (the scripts do)")
        if isinstance(self.full_steps, str):
            return tuple(read_steps(self.full_steps[1:], num_steps, "deep"))
        if self.full_steps is not None:
            if self.full_steps[-1] >= num_steps:
                raise ValueError(f"DeepCache full_steps {list(self.full_steps)} go past the last loop index "
                                 f"{num_steps - 1} of {num_steps} steps")
            return self.full_steps
        if self.interval is None:
            return tuple(range(num_steps))
        if not self.nonuniform:
            return tuple(range(0, num_steps, self.interval))
        count = math.ceil(num_steps / self.interval)
        points = np.linspace(0, num_steps ** (1 / self.pow), count + 1) ** self.pow
        return tuple(int(i) for i in np.unique(np.int32(points))[:-1])

    def bind(self, calls, guidance, timesteps, x_T):
        """The strategy for one sampling run (see `ldm.models.diffusion.cache`)."""
        full = frozenset(self.full_steps_for(len(timesteps)))
        calls.check_splittable(guidance, "DeepCache")
        calls.unet.check_branch(self.branch)
        return _DeepCacheRun(full, self.branch, self.forecast, calls, guidance, timesteps)


class _DeepCacheRun(Strategy):
    """Full steps run the whole UNet and keep its deep features; other steps run the shallow branch on the
    current x (guidance rows included) against the features kept last, or forecast from the full steps so far."""

    def __init__(self, full_steps, branch, forecast, calls, guidance, timesteps):
        self.full_steps, self.branch, self.calls, self.guidance, self.timesteps = (
            full_steps, branch, calls, guidance, timesteps)
        self.deep = TaylorFeatures(forecast)

    def __call__(self, x, i):
        net = self._full if i in self.full_steps else self._shallow
        return self.guidance(functools.partial(net, i), x, self.timesteps[i])

    def _full(self, i, x, t, context):
        out, deep = self.calls.forward_deep(x, t, context, self.branch)
        self.deep.refresh(i, deep)
        return out

    def _shallow(self, i, x, t, context):
        deep, = self.deep.at_step(i)
        return self.calls.forward_shallow(x, deep, t, context, self.branch)
