"""Sampling modes: a solver (ddim, plms, dpmpp2m, dpmpp3m) and a cache (`ldm.models.diffusion.caches`) with their
options, checked together before any model work, and the one grammar that names them:

    SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...][@S]

VALUE sets the cache's main option (fd: key_steps, deepcache: an interval, or full steps); OPTION is any option of
the solver or the cache, or `precision`; S is the number of steps. `format_mode` writes a mode back:

    mode = parse_mode("dpmpp2m+deepcache:3,branch=1,precision=bf16@20")
    format_mode(mode)  # 'dpmpp2m+deepcache:3,branch=1,precision=bf16@20'
    latents, intermediates = mode.sample(model, 20, batch_size, shape, c, unconditional_guidance_scale=1.5,
                                         unconditional_conditioning=uc)
"""
import inspect
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from ldm.models.diffusion.cache import Cache, NoCache, UNetCall
from ldm.models.diffusion.caches import CACHES
from ldm.models.diffusion.ddim import DDIMSampler, make_ddim_timesteps
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.guidance import unet_rows
from ldm.models.diffusion.options import Option, boolean, number
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.schedules import DPM_SKIP_TYPES
from ldm.util import PRECISIONS

DPM_OPTIONS = (
    Option("skip_type", str, choices=DPM_SKIP_TYPES, help="DPM-Solver++ time spacing (default time_uniform)"),
    Option("lower_order_final", boolean, help="DPM-Solver++: lower orders at the last steps when S < 10 (default true)"),
)
PRECISION = Option("precision", str, choices=PRECISIONS)


@dataclass(frozen=True)
class Solver:
    """A solver's front end, its fixed arguments and its options; first_step_calls: whole-UNet calls besides one a
    step (PLMS evaluates its first step twice)."""
    name: str
    label: str
    front_end: type
    fixed: dict = field(default_factory=dict)
    options: tuple = ()
    first_step_calls: int = 0

    def check_steps(self, steps):
        """A one-line ValueError if the solver cannot take this many steps."""
        order = self.fixed.get("order")
        if order is None:
            make_ddim_timesteps(steps)
        elif steps < order:
            raise ValueError(f"DPM-Solver++ of order {order} needs at least {order} steps, not {steps}")


SOLVERS = {solver.name: solver for solver in (
    Solver("ddim", "DDIM", DDIMSampler, options=(Option("eta", number, default=0.0, help="DDIM eta (0 = deterministic)"),)),
    Solver("plms", "PLMS", PLMSSampler, first_step_calls=1),
    Solver("dpmpp2m", "DPM-Solver++ 2M", DPMSolverSampler, {"order": 2}, DPM_OPTIONS),
    Solver("dpmpp3m", "DPM-Solver++ 3M", DPMSolverSampler, {"order": 3}, DPM_OPTIONS),
)}
SAMPLERS = SOLVERS  # the name front ends have used


def cache_class(name):
    """The cache class of a name; a one-line ValueError naming the choices."""
    if name not in CACHES:
        raise ValueError(f"unknown cache {name!r}; choose one of {', '.join(CACHES)}")
    return CACHES[name]


def cache_options(name):
    """The option names a cache takes."""
    return tuple(option.name for option in cache_class(name).options)


def solver_options(name):
    return tuple(option.name for option in SOLVERS[name].options)


def option_owners(key, by="name"):
    """([caches], [solvers]) that take an option, by its name (or by="dest": by its flag's destination)."""
    def owns(options):
        return any(getattr(option, by) == key for option in options)
    return ([name for name, cls in CACHES.items() if owns(cls.options)],
            [name for name, solver in SOLVERS.items() if owns(solver.options)])


def owner_reason(key, by="name"):
    """': ' + why an option is its owners' alone, where one of them says why; else ''."""
    options = [o for cls in CACHES.values() for o in cls.options] + [o for s in SOLVERS.values() for o in s.options]
    reason = next((o.owner_reason for o in options if getattr(o, by) == key and o.owner_reason), "")
    return f": {reason}" if reason else ""


@dataclass(frozen=True)
class Mode:
    """A solver (a SOLVERS name) with its options and a cache plan (None or a Cache); a mode string may also give
    the steps S and the precision (None: the front end's)."""
    sampler: str = "ddim"
    cache: Any = None
    eta: float = 0.0
    skip_type: str = "time_uniform"
    lower_order_final: bool = True
    steps: int = None
    precision: str = None

    def __post_init__(self):
        if self.sampler not in SOLVERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SOLVERS)}")
        if self.cache is not None and not isinstance(self.cache, Cache):
            raise TypeError(f"cache must be None or a cache plan (ldm.models.diffusion.caches), "
                            f"not {type(self.cache).__name__}")
        if self.eta != 0 and self.sampler != "ddim":
            raise ValueError(f"eta {self.eta} needs the ddim sampler; {self.sampler} is deterministic (eta 0)")
        if self.skip_type not in DPM_SKIP_TYPES:
            raise ValueError(f"unknown DPM-Solver skip_type {self.skip_type!r}; "
                             f"choose one of {', '.join(DPM_SKIP_TYPES)}")
        if not self.is_dpm and (self.skip_type, self.lower_order_final) != ("time_uniform", True):
            raise ValueError(f"skip_type and lower_order_final are DPM-Solver++ options, not {self.sampler}'s")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.steps is not None:
            self.solver.check_steps(self.steps)
            self.check(self.steps)

    @property
    def solver(self):
        return SOLVERS[self.sampler]

    @property
    def is_dpm(self):
        return self.solver.front_end is DPMSolverSampler

    @property
    def plan(self):
        """The cache plan, NoCache() for none."""
        return self.cache if self.cache is not None else NoCache()

    @property
    def cache_name(self):
        return self.plan.name

    @property
    def label(self):
        """A short name for tables, pictures and records, e.g. 'DDIM + FD uniform:4' or 'DPM-Solver++ 2M +
        DeepCache N=3'."""
        label = self.solver.label
        if self.eta:
            label += f" eta {self.eta:g}"
        if self.skip_type != "time_uniform":
            label += f" {self.skip_type}"
        if self.cache is not None:
            label += f" + {self.cache.label()}"
        return label

    def check(self, steps):
        """A one-line ValueError if the cache cannot run this many steps."""
        self.plan.check(steps)

    def with_steps(self, steps):
        """This mode with its cache's key or full steps at these loop indices (see Cache.with_steps)."""
        return replace(self, cache=self.cache.with_steps(steps))

    def unet_calls(self, steps, rows):
        """Counter of UNetCall: every UNet call of sampling `steps` steps at `rows` rows a step."""
        return self.plan.unet_calls(steps, rows) + Counter({UNetCall("full"): self.solver.first_step_calls})

    def for_counting(self, batch_size, guided):
        """This mode for counting on one image the UNet work per image of a batch_size run (see Cache.at_rows)."""
        if self.cache is None:
            return self
        return replace(self, cache=self.cache.at_rows(unet_rows(batch_size, guided), unet_rows(1, guided)))

    def sampler_for(self, model):
        return self.solver.front_end(model)

    def sample(self, model, S, batch_size, shape, conditioning=None, **kwargs):
        """The front end's sample() with this mode's solver options and cache; returns (x_0, intermediates)."""
        options = dict(self.solver.fixed, cache=self.cache, **kwargs)
        if self.is_dpm:
            options.update(skip_type=self.skip_type, lower_order_final=self.lower_order_final)
        else:
            options.update(eta=self.eta)
        return self.sampler_for(model).sample(S, batch_size, shape, conditioning, **options)


def make_cache(name, **options):
    """A cache plan from its name and options; options set to None count as not given."""
    cls = cache_class(name)
    options = {k: v for k, v in options.items() if v is not None}
    allowed = cache_options(name)
    for key in options:
        if key not in allowed:
            owners = option_owners(key)[0]
            where = f"an option of cache {owners[0]!r}" if owners else "not a cache option"
            raise ValueError(f"{key} is {where}, not of {name!r}" + (owner_reason(key) or (
                f" (its options: {', '.join(allowed)})" if allowed else "")))
    if cls is NoCache:
        return None
    return cls.from_options(**options)


def make_mode(sampler="ddim", cache="none", eta=0.0, skip_type="time_uniform", lower_order_final=True,
              steps=None, precision=None, **options):
    """A checked Mode from names: make_mode("ddim", "fd", key_steps="uniform:4"). Options set to None count as
    not given; an option of another cache, or a combination that cannot run, is a one-line ValueError."""
    return Mode(sampler, make_cache(cache, **options), eta, skip_type, lower_order_final, steps, precision)


def split_spec(spec):
    """'SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...][@S]' -> (solver, cache, VALUE or None, {option: text}, S or None).

    A comma-separated part without '=' continues VALUE (key steps 0,5,10); S is a trailing @digits (an '@FILE'
    in VALUE is a calibration file)."""
    body, steps = spec.strip(), None
    match = re.fullmatch(r"(.*)@(\d+)", body)
    if match:
        body, steps = match.group(1), int(match.group(2))
    parts = body.split(",")
    head = ",".join([parts[0], *(p for p in parts[1:] if "=" not in p)])
    sampler, _, cached = head.partition("+")
    cache, colon, value = cached.partition(":")
    options = {}
    for part in (p for p in parts[1:] if "=" in p):
        key, _, text = part.partition("=")
        if key.strip() in options:
            raise ValueError(f"option {key.strip()!r} is given twice")
        options[key.strip()] = text.strip()
    return sampler.strip(), (cache.strip() or "none"), (value.strip() if colon else None), options, steps


def parse_mode(spec, eta=0.0, skip_type="time_uniform", lower_order_final=True, **defaults):
    """A Mode from 'SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...][@S]', e.g. 'ddim', 'ddim+fd:uniform:4@50',
    'dpmpp2m+deepcache:3,precision=bf16'.

    `defaults` are options shared by a list of modes (with eta, skip_type and lower_order_final): each mode takes
    the ones its solver or cache knows and ignores the others. The spec's own options must be its solver's or
    cache's (or precision), and win over the shared ones. Every error is one line naming the spec.
    """
    arguments = mode_arguments(spec, eta=eta, skip_type=skip_type, lower_order_final=lower_order_final, **defaults)
    return naming(spec, make_mode, **arguments)


def naming(spec, build, *args, **kwargs):
    """build(*args, **kwargs), its one-line ValueError or TypeError prefixed with the mode string."""
    try:
        return build(*args, **kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        raise type(e)(message if f"mode {spec!r}" in message else f"mode {spec!r}: {message}") from None


def mode_arguments(spec, **defaults):
    """make_mode's arguments for a mode string with shared defaults (see parse_mode); nothing is built, so that a
    front end may resolve calibrated steps first."""
    return naming(spec, _mode_arguments, spec, defaults)


def _mode_arguments(spec, defaults):
    sampler, cache, value, texts, steps = split_spec(spec)
    if sampler not in SOLVERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SOLVERS)}")
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r} in mode {spec!r}; choose one of {', '.join(CACHES)}")
    cls, solver = CACHES[cache], SOLVERS[sampler]
    known = {o.name for name in CACHES for o in CACHES[name].options} | {o.name for s in SOLVERS.values()
                                                                          for o in s.options} | {"precision"}
    unknown = sorted(k for k in defaults if k not in known)
    if unknown:
        raise ValueError(f"{unknown[0]} is not an option of any cache ({', '.join(CACHES)})")
    solver_opts = {k: v for k, v in defaults.items() if k in solver_options(sampler)}
    cache_opts = {k: v for k, v in defaults.items() if k in cache_options(cache) and v is not None}
    precision = defaults.get("precision")
    if value is not None:
        if cls is NoCache:
            raise ValueError(f"a value needs a cache ({', '.join(f'{c}:VALUE' for c in CACHES if c != 'none')})")
        for key in (cls.main_option, cls.steps_option):
            cache_opts.pop(key, None)
        cache_opts.update(cls.main_value(value))
    for key, text in texts.items():
        option = next((o for o in (*solver.options, *cls.options, PRECISION) if o.name == key), None)
        if option is None:
            owners = [name for names in option_owners(key) for name in names]
            options = ", ".join(o.name for o in (*solver.options, *cls.options, PRECISION))
            if owners:
                raise ValueError(f"{key} is an option of {owners[0]!r}, not of {sampler}+{cache}" +
                                 (owner_reason(key) or f" (its options: {options})"))
            raise ValueError(f"unknown option {key!r} of {sampler}+{cache} (its options: {options})")
        if option is PRECISION:
            precision = option.read(text)
        else:
            (solver_opts if option in solver.options else cache_opts)[key] = option.read(text)
    return dict(sampler=sampler, cache=cache, steps=steps, precision=precision, **solver_opts, **cache_opts)


def format_mode(mode):
    """The mode string of a mode: parse_mode(format_mode(mode)) builds the same mode. Options at their defaults
    are left out."""
    spec, options = mode.sampler, []
    for option in mode.solver.options:
        value = getattr(mode, option.name)
        if value != Mode.__dataclass_fields__[option.name].default:
            options.append(f"{option.name}={option.text(value)}")
    if mode.cache is not None:
        main, written = mode.cache.main_text()
        spec += f"+{mode.cache.name}" + (f":{main}" if main is not None else "")
        defaults = {p.name: p.default for p in inspect.signature(type(mode.cache)).parameters.values()}
        for option in mode.cache.options:
            value = getattr(mode.cache, option.name)
            if option.name not in written and value is not None and value != defaults.get(option.name):
                options.append(f"{option.name}={option.text(value)}")
    if mode.precision is not None:
        options.append(f"precision={mode.precision}")
    return spec + "".join(f",{o}" for o in options) + (f"@{mode.steps}" if mode.steps is not None else "")
