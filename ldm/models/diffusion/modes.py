"""Sampling modes by name, for front ends: a solver (ddim, plms, dpmpp2m, dpmpp3m) and a cache (none, fd,
deepcache) with their options, checked together before any model work.

    mode = make_mode("dpmpp2m", "deepcache", interval=3)      # or parse_mode("dpmpp2m+deepcache:3")
    latents, intermediates = mode.sample(model, S, batch_size, shape, c, unconditional_guidance_scale=1.5,
                                         unconditional_conditioning=uc)
"""
import inspect
from dataclasses import dataclass, replace
from typing import Any

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.deepcache import DeepCache
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.models.diffusion.guidance import unet_rows
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.schedules import DPM_SKIP_TYPES

# name -> (front end, its fixed options, label)
SAMPLERS = {
    "ddim": (DDIMSampler, {}, "DDIM"),
    "plms": (PLMSSampler, {}, "PLMS"),
    "dpmpp2m": (DPMSolverSampler, {"order": 2}, "DPM-Solver++ 2M"),
    "dpmpp3m": (DPMSolverSampler, {"order": 3}, "DPM-Solver++ 3M"),
}
CACHES = {"none": None, "fd": FasterDiffusion, "deepcache": DeepCache}
# The option that `parse_mode`'s "CACHE:VALUE" sets.
MAIN_OPTION = {"fd": "key_steps", "deepcache": "interval"}


def cache_options(name):
    """The option names a cache takes (its constructor's parameters)."""
    cls = CACHES[name]
    return () if cls is None else tuple(inspect.signature(cls).parameters)


@dataclass(frozen=True)
class Mode:
    """A solver (a SAMPLERS name) with its options and a cache plan (None, FasterDiffusion or DeepCache)."""
    sampler: str = "ddim"
    cache: Any = None
    eta: float = 0.0
    skip_type: str = "time_uniform"
    lower_order_final: bool = True

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.cache is not None and not isinstance(self.cache, (FasterDiffusion, DeepCache)):
            raise TypeError(f"cache must be None, a FasterDiffusion or a DeepCache, not {type(self.cache).__name__}")
        if self.eta != 0 and self.sampler != "ddim":
            raise ValueError(f"eta {self.eta} needs the ddim sampler; {self.sampler} is deterministic (eta 0)")
        if self.skip_type not in DPM_SKIP_TYPES:
            raise ValueError(f"unknown DPM-Solver skip_type {self.skip_type!r}; "
                             f"choose one of {', '.join(DPM_SKIP_TYPES)}")
        if SAMPLERS[self.sampler][0] is not DPMSolverSampler and (self.skip_type, self.lower_order_final) != (
                "time_uniform", True):
            raise ValueError(f"skip_type and lower_order_final are DPM-Solver++ options, not {self.sampler}'s")

    @property
    def label(self):
        """A short name for tables, e.g. 'DDIM + FD uniform:4' or 'DPM-Solver++ 2M + DeepCache N=3'."""
        label = SAMPLERS[self.sampler][2]
        if self.eta:
            label += f" eta {self.eta:g}"
        if self.skip_type != "time_uniform":
            label += f" {self.skip_type}"
        cache = self.cache
        if isinstance(cache, FasterDiffusion):
            keys = cache.key_steps if isinstance(cache.key_steps, str) else ",".join(map(str, cache.key_steps))
            label += f" + FD{'-ref' if cache.context_layout == 'reference' else ''} {keys}"
        elif isinstance(cache, DeepCache):
            if isinstance(cache.full_steps, str):  # @calibration.json
                label += f" + DeepCache {cache.full_steps}"
            elif cache.full_steps is not None:
                label += f" + DeepCache {len(cache.full_steps)} full steps"
            else:
                label += f" + DeepCache N={cache.interval}{' nonuniform' if cache.nonuniform else ''}"
            if cache.branch:
                label += f" branch {cache.branch}"
        return label

    def for_counting(self, batch_size, guided):
        """This mode for counting on one image the UNet work per image of a batch_size run: FasterDiffusion's decoder
        calls then hold as many steps as at batch_size (FasterDiffusion.at_rows); no other mode's work per image
        depends on the batch size."""
        if not isinstance(self.cache, FasterDiffusion):
            return self
        return replace(self, cache=self.cache.at_rows(unet_rows(batch_size, guided), unet_rows(1, guided)))

    def sampler_for(self, model):
        return SAMPLERS[self.sampler][0](model)

    def sample(self, model, S, batch_size, shape, conditioning=None, **kwargs):
        """The front end's sample() with this mode's solver options and cache; returns (x_0, intermediates)."""
        cls, options = SAMPLERS[self.sampler][:2]
        options = dict(options, cache=self.cache, **kwargs)
        if cls is DPMSolverSampler:
            options.update(skip_type=self.skip_type, lower_order_final=self.lower_order_final)
        else:
            options.update(eta=self.eta)
        return cls(model).sample(S, batch_size, shape, conditioning, **options)


def make_cache(name, **options):
    """A cache plan from its name and options; options set to None count as not given."""
    if name not in CACHES:
        raise ValueError(f"unknown cache {name!r}; choose one of {', '.join(CACHES)}")
    options = {k: v for k, v in options.items() if v is not None}
    allowed = cache_options(name)
    for key in options:
        if key not in allowed:
            owners = [c for c in CACHES if key in cache_options(c)]
            where = f"an option of cache {owners[0]!r}" if owners else "not a cache option"
            raise ValueError(f"{key} is {where}, not of {name!r}" + (f" (its options: {', '.join(allowed)})"
                                                                     if allowed else ""))
    if name == "none":
        return None
    if name == "fd" and "key_steps" not in options:
        raise ValueError("cache 'fd' needs key_steps (a preset such as ldm250 or uniform:4, or loop indices)")
    if name == "deepcache" and "interval" not in options and "full_steps" not in options:
        raise ValueError("cache 'deepcache' needs an interval (a full step every N steps) or full_steps")
    return CACHES[name](**options)


def make_mode(sampler="ddim", cache="none", eta=0.0, skip_type="time_uniform", lower_order_final=True,
              **options):
    """A checked Mode from names: make_mode("ddim", "fd", key_steps="uniform:4"). Options set to None count as
    not given; an option of another cache, or a combination that cannot run, is a one-line ValueError."""
    return Mode(sampler, make_cache(cache, **options), eta, skip_type, lower_order_final)


def parse_mode(spec, eta=0.0, skip_type="time_uniform", lower_order_final=True, **options):
    """'SAMPLER[+CACHE[:VALUE]]' -> Mode, e.g. 'ddim', 'ddim+fd:uniform:4', 'dpmpp2m+deepcache:3'.

    VALUE sets the cache's main option (fd: key_steps, deepcache: interval). `options` are shared by a list of
    modes: each cache takes the ones it knows and ignores the others; skip_type and lower_order_final reach
    DPM-Solver++ modes only.
    """
    sampler, _, cache_spec = spec.strip().partition("+")
    cache, _, value = cache_spec.partition(":")
    cache = cache or "none"
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r} in mode {spec!r}; choose one of {', '.join(CACHES)}")
    unknown = sorted(k for k in options if not any(k in cache_options(c) for c in CACHES))
    if unknown:
        raise ValueError(f"{unknown[0]} is not an option of any cache ({', '.join(CACHES)})")
    mine = {k: v for k, v in options.items() if k in cache_options(cache)}
    if value:
        if cache == "none":
            raise ValueError(f"mode {spec!r}: a value needs a cache (fd:KEY_STEPS or deepcache:INTERVAL)")
        mine[MAIN_OPTION[cache]] = int(value) if MAIN_OPTION[cache] == "interval" and value.isdigit() else value
    dpm = sampler in SAMPLERS and SAMPLERS[sampler][0] is DPMSolverSampler
    return make_mode(sampler, cache, eta, skip_type if dpm else "time_uniform",
                     lower_order_final if dpm else True, **mine)
