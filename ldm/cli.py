"""The command line shared by `infer_ldm.py` and `scripts/image_sample.py`: argument groups, checks, loading.

Each script builds its parser from the groups below and sets its own defaults with `parser.set_defaults`.
Every flag has one name and, where the published sampling script spelled it differently, that name as an
alias (`--steps`/`--ddim_steps`, ...), so published commands run unchanged with either script. Bad input
of any kind is a `UsageError`: one `error: ...` line on stderr and exit status `BAD_INPUT`, as argparse
does for malformed flags.
"""
import argparse
import contextlib
import functools
import math
import os
import signal
import sys
from dataclasses import replace

import torch

from ldm.autobatch import AUTO_BATCH
from ldm.calibration import auto_steps, is_calibrated, read_steps
from ldm.compile import COMPILE_CACHE, compile_unet, mode_buckets, use_compile_cache, warm_up
from ldm.models.diffusion.caches import CACHES
from ldm.models.diffusion.ddim import make_ddim_timesteps
from ldm.models.diffusion.guidance import unet_rows
from ldm.models.diffusion import modes
from ldm.models.diffusion.modes import SOLVERS, mode_arguments, split_spec
from ldm.models.diffusion.modes import make_mode as make_library_mode
from ldm.models.diffusion.options import OptionError, boolean, fits_float32, non_negative_float, step_list  # noqa: F401
from ldm.models.diffusion.schedules import max_ddim_eta
from ldm.modules.attention import ATTENTION_BACKENDS
from ldm.sampling import num_classes
from ldm.util import (PRECISIONS, ArchitectureMismatch, build_model, check_file, check_precision, file_sha256, load_model,
                      optimize_for_inference, set_tf32)

BAD_INPUT = 2
DEFAULT_CONFIG = "configs/latent-diffusion/cin256-v2.yaml"
DEFAULT_CKPT = "models/ldm/cin256-v2/model.ckpt"
MAX_SEED = 2**63 - 1
DEVICE_TYPES = ("cpu", "cuda")
# What building or loading a model raises for a config or checkpoint that does not fit.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError, NotImplementedError)


class UsageError(Exception):
    """Bad input, reported as one `error: ...` line and exit status BAD_INPUT."""


class Parser(argparse.ArgumentParser):
    """argparse without abbreviated flags that reports bad flags as one line with exit status BAD_INPUT, and
    records in `args.given` the destinations the command line set (a flag at its default value included; an
    optional positional argument always counts, as argparse sets it even when absent)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(BAD_INPUT, f"error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        probe = super().parse_args(args, _NoDefaults())
        parsed.given = frozenset(vars(probe))
        return parsed


class _NoDefaults(argparse.Namespace):
    """A namespace that seems to hold every attribute (None), so that argparse, which fills in a default only
    where an attribute is missing, fills in none: after parsing, it holds what the command line set (an append
    flag starts from None, as in a fresh namespace). argparse's own attributes start with '_' and stay missing."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return None


def report(error):
    """Print a UsageError as its one line; returns BAD_INPUT, the exit status."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return BAD_INPUT


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


def interrupt_exit_status(interrupt):
    """128 + the signal number, as a shell reports a process that a signal ended: 143 for SIGTERM, else 130."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM (what schedulers and `kill` send) raises Terminated and Ctrl-C KeyboardInterrupt
    (whatever `ldm.startup` set for the imports before it)."""
    def interrupt(signum, frame):
        raise Terminated

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt)}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored (nohup, a background job): left so
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be restored
                signal.signal(signum, handler)


def one_line_failures(main):
    """Decorates a script's main(argv): an OSError (a full disk, a folder that is not writable) and Ctrl-C or
    SIGTERM end it with one line on stderr and a non-zero exit status instead of a traceback."""
    @functools.wraps(main)
    def guarded(argv=None):
        try:
            with sigterm_as_interrupt():
                return main(argv)
        except KeyboardInterrupt as interrupt:
            print("stopped", file=sys.stderr, flush=True)
            return interrupt_exit_status(interrupt)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            print(f"error: {e.strerror or first_line(e)}{where}", file=sys.stderr, flush=True)
            return 1
    return guarded


def first_line(error):
    """The first line of an exception's message, or its type name."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


str2bool = boolean  # the published scripts' name


def add_bool_flag(group, *names, default, help):
    """A flag that is true alone (`--x`) and also takes the published spelling `--x True` / `--x no`."""
    group.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


# ----------------------------------------------------------------------------------------------------------
# Argument groups


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--config", "--config_path", dest="config", default=DEFAULT_CONFIG,
                       help="model config (upstream LDM yaml)")
    group.add_argument("--ckpt", "--model_path", dest="ckpt", default=DEFAULT_CKPT,
                       help="checkpoint (.ckpt or .safetensors)")
    group.add_argument("--allow_pickle", action="store_true",
                       help="allow a checkpoint holding pickled Python objects (only for files you trust)")


def add_sampling_args(parser):
    group = parser.add_argument_group("sampling")
    group.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=250,
                       help="sampling steps S (DDIM and PLMS: a uniform schedule over the 1000 timesteps)")
    group.add_argument("--eta", "--ddim_eta", dest="eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    group.add_argument("--scale", "--classifier_scale", dest="scale", type=float, default=1.5,
                       help="classifier-free guidance scale (1 = no guidance)")
    group.add_argument("--seed", type=int, default=0, help=f"seed of the noise (and labels), 0..{MAX_SEED}")


class CacheFlag(argparse.Action):
    """`--faster_diffusion [BOOL]`, the published spelling of `--cache fd` (true) and `--cache none` (false)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", const="true", metavar="BOOL", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            enabled = str2bool(value)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option_string}: {e}")
        setattr(namespace, self.dest, "fd" if enabled else "none")


def option_flag(group, option, parser):
    """A flag of a solver's or a cache's Option, unless the parser has it already (an option two caches share)."""
    if f"--{option.dest}" in parser._option_string_actions:
        return
    if option.parse is boolean:
        add_bool_flag(group, f"--{option.dest}", default=option.default, help=option.help)
    else:
        group.add_argument(f"--{option.dest}", type=option.parse, choices=option.choices, default=option.default,
                           help=option.help)


def add_mode_args(parser):
    """Solver and cache with their options, made from their declarations (`ldm.models.diffusion.modes`,
    `ldm.models.diffusion.caches`); `--mode` names them all at once; `--faster_diffusion` is an alias."""
    group = parser.add_argument_group("solver and cache")
    group.add_argument("--mode", default=None, metavar="MODE",
                       help="SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...][@S], e.g. dpmpp2m+deepcache:3,branch=1@20: "
                            "the flags below in one string")
    group.add_argument("--sampler", choices=list(SOLVERS), default="ddim",
                       help="solver: ddim, plms, dpmpp2m or dpmpp3m (DPM-Solver++ multistep, order 2 or 3)")
    group.add_argument("--cache", choices=list(CACHES), default="none",
                       help="; ".join(f"{name}" + (f" ({cls.title})" if cls.title else "") for name, cls in CACHES.items()))
    group.add_argument("--faster_diffusion", "--use_faster_diffusion", dest="cache", action=CacheFlag,
                       help="the published flag: true = --cache fd, false = --cache none")
    for solver in SOLVERS.values():
        for option in solver.options:
            option_flag(group, option, parser)
    for name, cls in CACHES.items():
        if cls.options:
            cache_group = parser.add_argument_group(f"{cls.title} (--cache {name})")
            for option in cls.options:
                option_flag(cache_group, option, parser)


def on_off(value):
    """'on' -> True, 'off' -> False."""
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {value!r}")
    return value == "on"


def batch_size_arg(value):
    """A batch size: a whole number, or 'auto' (the largest that fits the GPU, see ldm.autobatch)."""
    if value == AUTO_BATCH:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples or {AUTO_BATCH}, not {value!r}") from None


def add_device_args(parser):
    group = parser.add_argument_group("device and speed")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a GPU if there is one, else cpu)")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="fp32, bf16, or fp16 (GPU only); bf16 and fp16 store the UNet's weights in that dtype")
    group.add_argument("--tf32", type=on_off, default=True, metavar="on|off",
                       help="on a GPU, fp32 matmuls and convolutions in TF32 (default on)")
    group.add_argument("--cudnn_benchmark", type=on_off, default=True, metavar="on|off",
                       help="on a GPU, cuDNN times its convolution algorithms once per shape and keeps the fastest "
                            "(default on)")
    group.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                       help="attention kernel: sdpa (PyTorch's fused kernel), matmul (two matmuls and a softmax), or "
                            "auto (default: matmul on a GPU for heads wider than flash attention's 256 channels)")
    group.add_argument("--channels_last", action="store_true", help="NHWC convolutions")
    group.add_argument("--compile", action="store_true",
                       help=f"torch.compile the UNet and its halves before sampling (cached in {COMPILE_CACHE})")
    add_bool_flag(group, "--tqdm_disable", default=False, help="no progress bars")


# ----------------------------------------------------------------------------------------------------------
# Checks, before any model work


def check_files(args):
    """The config and the checkpoint are files; a missing checkpoint comes with the command that fetches it."""
    try:
        check_file(args.config, "config")
    except OSError as e:
        raise UsageError(str(e)) from None
    try:
        check_file(args.ckpt, "checkpoint")
    except FileNotFoundError as e:
        if not is_cin256_config(args.config):  # download_model.py fetches cin256-v2's weights, no other model's
            raise UsageError(f"{e}; give --ckpt the checkpoint that goes with the config {args.config}") from None
        fetch = "python scripts/download_model.py" + ("" if args.ckpt == DEFAULT_CKPT else f" --out {args.ckpt}")
        raise UsageError(f"{e}; download it with `{fetch}`") from None
    except OSError as e:
        raise UsageError(str(e)) from None


def is_cin256_config(path):
    """Whether a config is the shipped cin256-v2 one (the same bytes), whose weights download_model.py fetches."""
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DEFAULT_CONFIG)
    try:
        return os.path.samefile(path, shipped) or file_sha256(path, cache_from_bytes=None) == \
            file_sha256(shipped, cache_from_bytes=None)
    except OSError:
        return False


def check_steps(sampler, steps):
    """The step count suits the solver: DDIM's and PLMS's uniform schedule, or DPM-Solver++'s order; a ValueError
    otherwise."""
    SOLVERS[sampler].check_steps(steps)


def check_sampling(args):
    """Step count (for the flags' solver), eta, guidance scale and seed."""
    try:
        check_steps(args.sampler, args.steps)
    except ValueError as e:
        raise UsageError(f"--steps: {e}") from None
    if not (fits_float32(args.eta) and args.eta >= 0):
        raise UsageError(f"--eta must be a number >= 0 that float32 can hold, not {args.eta}")
    if not fits_float32(args.scale):
        raise UsageError(f"--scale must be a finite number that float32 can hold, not {args.scale}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in 0..{MAX_SEED}, not {args.seed}")


def option_owners(flag):
    """(caches, solvers) that take a flag (by its destination)."""
    return modes.option_owners(flag, by="dest")


def check_flags_fit(args, rows=()):
    """Each cache's flags need that cache, a solver's flags that solver, eta > 0 DDIM: in the flags' mode or in one
    of rows, more (sampler, cache) pairs that take their options from the flags."""
    samplers = {args.sampler, *(sampler for sampler, _ in rows)}
    caches = {args.cache, *(cache for _, cache in rows)}
    for flag in sorted(args.given):
        if flag == "eta":
            continue
        owning_caches, owning_solvers = option_owners(flag)
        if owning_caches and not caches & set(owning_caches):
            raise UsageError(f"--{flag} is a {CACHES[owning_caches[0]].title} option: add --cache {owning_caches[0]} "
                             f"(the cache is {args.cache})" + modes.owner_reason(flag, by="dest"))
        if owning_solvers and not samplers & set(owning_solvers):
            family = os.path.commonprefix([SOLVERS[s].label for s in owning_solvers]).strip()
            raise UsageError(f"--{flag} is a {family} option (--sampler {' or '.join(owning_solvers)}), "
                             f"not one of {args.sampler}")
    if args.eta != 0 and "ddim" not in samplers:
        raise UsageError(f"--eta {args.eta:g} needs --sampler ddim; {args.sampler} is deterministic (eta 0)")


def flag_options(args, cache):
    """The options of a cache (by option name) that the flags give; those not given and without a default are
    left out."""
    return {o.name: getattr(args, o.dest) for o in CACHES[cache].options if getattr(args, o.dest, None) is not None}


def shared_options(args):
    """Every cache's and solver's options as the flags give them: the defaults of the modes of a --compare list."""
    options = {}
    for name in CACHES:
        options.update(flag_options(args, name))
    return dict(options, eta=args.eta, skip_type=getattr(args, "skip_type", None) or "time_uniform",
                lower_order_final=getattr(args, "lower_order_final", None) is not False)


def apply_mode_flag(args):
    """--mode MODE sets the flags it names (solver, cache, their options, --steps from @S, --precision) as if they
    were given one by one; a flag also given with another value is a UsageError. The mode is built and checked
    from the flags later, as any."""
    if args.mode is None:
        return
    try:
        arguments = mode_arguments(args.mode, **shared_options(args))
    except (ValueError, TypeError) as e:
        raise UsageError(first_line(e)) from None
    _, cache, value, texts, _ = split_spec(args.mode)
    named = set(texts) | ({CACHES[cache].main_option, CACHES[cache].steps_option} if value is not None else set())
    settings = {"sampler": arguments["sampler"], "cache": cache}
    settings.update({key: arguments[key] for key in ("steps", "precision") if arguments[key] is not None})
    for option in (*SOLVERS[arguments["sampler"]].options, *CACHES[cache].options):
        if option.name in named:
            settings[option.dest] = arguments.get(option.name)
    for dest, value in settings.items():
        if dest in args.given and getattr(args, dest) != value:
            raise UsageError(f"--mode {args.mode} sets {dest} to {value}, and --{dest} to {getattr(args, dest)}: "
                             "give it once")
        setattr(args, dest, value)
    args.given = args.given | set(settings)
    args.mode = None  # applied: applying again changes nothing


def read_step_file(options, cache, args):
    """Key/full steps '@FILE.json' -> the loop indices the file holds, checked against --steps, the cache's feature
    and the checkpoint. Other specs stay as they are ('auto:K' is calibrated once the model is loaded: calibrate)."""
    cls = CACHES[cache]
    key = cls.steps_option
    spec = options.get(key)
    if not (is_calibrated(spec) and spec.startswith("@")):
        return options
    steps = read_steps(spec[1:], args.steps, cls.feature, file_sha256(args.ckpt) if os.path.isfile(args.ckpt) else None)
    return {**{k: v for k, v in options.items() if k not in (cls.main_option, key)}, key: steps}


def calibrate(mode, model, args):
    """The mode with its 'auto:K' steps calibrated on the loaded model (`ldm.calibration.auto_steps`); any other
    mode as it is. A run calls it once, and records the steps it gives."""
    spec = mode.plan.calibrating()
    if spec is None:
        return mode
    solver = replace(mode, cache=None)
    steps = auto_steps(model, spec, solver, mode.with_steps, args.steps, args.scale, mode.plan.feature,
                       getattr(mode.plan, "branch", 0), args.precision)
    return mode.with_steps(steps)


def make_mode(args, name=None, context_layout=None, rows=()):
    """The sampling mode of the flags, or of a mode string (`ldm.models.diffusion.modes`) with the flags' options
    as its defaults, checked against --steps before any model work. Steps of a file are read here, once; 'auto:K'
    steps are left to `calibrate`.

    rows: (sampler, cache) of the other modes sampled with these flags (see check_flags_fit).
    """
    if name is None:
        check_flags_fit(args, rows)
        options = flag_options(args, args.cache)
        if context_layout is not None:
            options["context_layout"] = context_layout
        where, cache = "", args.cache
        solver = dict(sampler=args.sampler, eta=args.eta if args.sampler == "ddim" else 0.0)
        if SOLVERS[args.sampler].fixed.get("order"):
            solver.update(skip_type=args.skip_type or "time_uniform", lower_order_final=args.lower_order_final is not False)
    else:
        where = f"mode {name!r}: "
        try:
            arguments = mode_arguments(name, **shared_options(args))
        except (ValueError, TypeError) as e:
            raise UsageError(first_line(e)) from None
        steps, _ = arguments.pop("steps"), arguments.pop("precision")
        if steps is not None and steps != args.steps:
            raise UsageError(f"{where}its @{steps} differs from --steps {args.steps}")
        cache = arguments.pop("cache")
        solver = {k: arguments.pop(k) for k in ("sampler", "eta", "skip_type", "lower_order_final") if k in arguments}
        options = arguments
    try:
        check_steps(solver["sampler"], args.steps)
    except ValueError as e:
        raise UsageError(f"{where}--steps: {e}") from None
    what = CACHES[cache].title or "mode"
    try:
        options = read_step_file(options, cache, args)
        mode = make_library_mode(cache=cache, **solver, **options)
        mode.check(args.steps)
    except (ValueError, TypeError) as e:
        why = first_line(e)
        if name is not None:
            raise UsageError(f"{where}{why}") from None
        raise UsageError(why if why.startswith(what) else f"{what}: {why}") from None
    return mode


def check_mode_fits(mode, model, steps):
    """What only the model tells: whether the cache fits the UNet (DeepCache's branch depth, say), and whether
    DDIM's eta keeps its noise within the model's schedule at S steps (past that every sample is NaN)."""
    try:
        mode.plan.check_unet(model.model.diffusion_model)
    except OptionError as e:
        option = next(o for o in mode.plan.options if o.name == e.option)
        raise UsageError(f"--{option.dest}: {e}") from None
    except ValueError as e:
        raise UsageError(first_line(e)) from None
    if mode.eta:
        limit = max_ddim_eta(torch.from_numpy(model.config_alphas_cumprod),
                             make_ddim_timesteps(steps, model.num_timesteps))
        if mode.eta > limit:
            raise UsageError(f"--eta {mode.eta:g}: DDIM's noise would exceed the schedule at {steps} steps, "
                             f"making every sample NaN; use at most {math.floor(limit * 1e4) / 1e4:g}")


def resolve_device(name, rank=0):
    """The device of --device, or by default this process's GPU (rank modulo GPUs) if CUDA works, else the CPU."""
    if name is None:
        return torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name such as cpu, cuda or cuda:0") from None
    if device.type not in DEVICE_TYPES:
        raise UsageError(f"--device {name}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_device(args, rank=0):
    """The device to run on, checked together with --precision."""
    device = resolve_device(args.device, rank)
    try:
        check_precision(args.precision, device)
    except ValueError as e:
        raise UsageError(f"--precision {args.precision}: {e}") from None
    check_precision_is_fast(args.precision, device, "--precision")
    return device


def cpu_has_native_bf16():
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX), as oneDNN sees it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision_is_fast(precision, device, flag, advice="use --precision fp32"):
    """bf16 on a CPU without native bfloat16 kernels is emulated, many times slower than fp32 (a cin256-v2 UNet
    forward: 179.5 s against 3.96 s on an AVX2-only AMD EPYC): the front ends refuse it there, in one line ending
    with advice. The Python API still computes in it."""
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        raise UsageError(f"{flag} bf16: this CPU has no native bfloat16 kernels (AVX-512 BF16 or AMX), so bf16 "
                         f"would run many times slower than fp32; {advice}")


def check_writable_folder(folder, flag):
    """The folder exists and is writable, or can be created: its nearest existing ancestor is a writable folder."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {folder}: cannot create a directory there ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: directory {existing} is not writable")


def check_output_file(path, flag):
    """An output file's name: not a directory, in a folder that exists and is writable (a file there, writable)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        problem = "is a file, not a directory" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"{flag} {path}: {folder} {problem}")
    if not os.access(folder, os.W_OK | os.X_OK) or os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable")


def inspect_model(args):
    """The model's structure without its weights (fast): a config that cannot be built, or a model without
    class labels, is a UsageError before the checkpoint is read."""
    try:
        model = build_model(args.config)
        num_classes(model)
    except LOAD_ERRORS as e:
        raise UsageError(f"cannot load the model: {first_line(e)}") from None
    scale_factor = model.scale_factor  # a tensor that the checkpoint sets with scale_by_std
    if not isinstance(scale_factor, torch.Tensor) and not (math.isfinite(scale_factor) and scale_factor != 0):
        raise UsageError(f"the config {args.config} sets scale_factor {scale_factor:g}: every latent would decode "
                         "to NaN; give a finite, non-zero scale_factor")
    return model


def check_classes(classes, model):
    """Class labels given on the command line are among the model's classes."""
    count = num_classes(model)
    unknown = [c for c in classes if not 0 <= c < count]
    if unknown:
        raise UsageError(f"unknown class {unknown[0]}: this model has {count} classes, 0..{count - 1}")


LOAD_FLAGS = ("config", "ckpt", "allow_pickle", "precision", "channels_last", "attention", "tf32", "cudnn_benchmark")


def load(args, device):
    """The model on the device, its UNet weights stored in --precision, channels-last if asked, its attention
    backend set, with the TF32 and cuDNN autotuner policies set; a config or checkpoint that does not load is a
    UsageError. `compile_for` compiles it. It reads the flags LOAD_FLAGS of args, no others."""
    try:
        model = load_model(args.config, args.ckpt, device=device, allow_pickle=args.allow_pickle)
    except ArchitectureMismatch as e:
        raise UsageError(f"cannot load the model: {first_line(e)}; the config {args.config} does not match the "
                         "checkpoint: give the config it was made with (--config; CONFIG_PATH for "
                         "run_image_sample.sh)") from None
    except LOAD_ERRORS as e:
        raise UsageError(f"cannot load the model: {first_line(e)}") from None
    broken = next((name for name, tensor in model.state_dict().items()
                   if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if broken is not None:
        raise UsageError(f"the checkpoint {args.ckpt} holds NaN or infinite weights ({broken}): every sample would "
                         "be NaN")
    set_tf32(args.tf32)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    return optimize_for_inference(model, channels_last=args.channels_last, precision=args.precision,
                                  attention=args.attention)


def compile_for(model, args, modes, batch_size):
    """With --compile: compile the UNet for the shapes that sampling the modes at batch_size meets, now, and
    return one line saying how long it took (None without --compile)."""
    if not args.compile:
        return None
    cache = use_compile_cache()
    rows = unet_rows(batch_size, args.scale != 1)
    buckets = mode_buckets(modes, args.steps, rows)
    compile_unet(model, buckets)
    shapes, seconds = warm_up(model, modes, args.steps, batch_size, args.scale != 1, args.precision, buckets)
    return f"compiled the UNet for {shapes} shapes in {seconds:.1f} s (compile cache: {cache})"
