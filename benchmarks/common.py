"""Shared pieces of the benchmarks: model construction, peak-memory tracking, tables, inductor options."""
import argparse
import ast
import math
import os
import re
import threading
import time
from contextlib import contextmanager

import torch
import torch._inductor.config
from omegaconf import OmegaConf

from ldm import cli
from ldm.cli import on_off
from ldm.models.diffusion.modes import make_cache
from ldm.util import check_file, instantiate_from_config, load_model


def build_model(config, ckpt=None, device="cpu", seed=0):
    """The model of a config, with a checkpoint's weights or random ones (seeded, made on the device: no copy
    through the CPU, and on the meta device no memory at all). A checkpoint that does not load is a UsageError."""
    if ckpt:
        try:
            return load_model(config, ckpt, device=device)
        except cli.LOAD_ERRORS as e:
            raise cli.UsageError(f"cannot load the model: {cli.first_line(e)}") from None
    torch.manual_seed(seed)
    with torch.device(device):
        model = instantiate_from_config(OmegaConf.load(config).model)
    return model.eval().requires_grad_(False)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory during a block (and `start`, the memory in use when it began): CUDA's allocator on GPU,
    resident set size (sampled) on CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.start = self.peak = 0

    @contextmanager
    def track(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        done = threading.Event()
        self.start = _rss_bytes()
        peak = [self.start]

        def poll():
            while not done.wait(0.002):
                peak[0] = max(peak[0], _rss_bytes())

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()
            self.peak = max(peak[0], _rss_bytes())


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def milliseconds_each(fn, device, repeats):
    """Wall-clock milliseconds per call of fn, over `repeats` calls (the device synchronized around them)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats * 1e3


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def print_table(header, rows):
    """A GitHub-markdown table."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def inductor_option(text):
    """argparse type of --inductor: "name=value", an option of torch._inductor.config and a Python literal, ->
    (name, value)."""
    name, equals, value = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"expected name=value, not {text!r}")
    if not hasattr(torch._inductor.config, name):
        raise argparse.ArgumentTypeError(f"torch._inductor.config has no option {name!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a Python literal") from None


def add_cudnn_benchmark_argument(parser):
    parser.add_argument("--cudnn_benchmark", type=on_off, default=True, metavar="on|off",
                        help="cuDNN's autotuner (torch.backends.cudnn.benchmark), on by default as in the scripts")


def add_inductor_argument(parser):
    parser.add_argument("--inductor", type=inductor_option, action="append", default=[], metavar="NAME=VALUE",
                        help="set an option of torch._inductor.config before compiling (repeatable), e.g. "
                             "coordinate_descent_tuning=True")


def inductor_options(options):
    """A context in which torch._inductor.config has the (name, value) options: the compiles inside it use them."""
    return torch._inductor.config.patch(dict(options))


def describe_options(options):
    return ", ".join(f"{name}={value}" for name, value in options) or "defaults"


def script_args(args, **values):
    """The sampling scripts' flags (ldm.cli's groups) at their defaults, with a benchmark's `args` and then `values`
    over them: a namespace for ldm.cli's checks (check_sampling, make_mode, check_device)."""
    parser = argparse.ArgumentParser()
    for add in (cli.add_model_args, cli.add_sampling_args, cli.add_mode_args, cli.add_device_args):
        add(parser)
    return argparse.Namespace(**{**vars(parser.parse_args([])), **vars(args), **values})


def refuse_auto_steps(flag, spec, script):
    """auto:K steps (alone or as a mode's VALUE) are chosen by calibrating on the weights, which the benchmarks
    do not do: a UsageError."""
    if isinstance(spec, str) and re.search(r"(^|:)\s*auto:", spec):
        raise cli.UsageError(f"{flag} {spec}: {script} needs explicit steps (loop indices, a preset, or the "
                             "@FILE.json of scripts/calibrate.py): auto:K steps are chosen by calibrating on the weights")


# ----------------------------------------------------------------------------------------------------------
# Checks of the benchmarks' flags, before any model work: argparse types (one-line errors with cli.Parser) and
# UsageErrors (cli.report)


def at_least(least):
    """argparse type: a whole number of at least `least`."""
    def whole(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value
    return whole


def whole_numbers(least=1):
    """argparse type: a comma list of whole numbers of at least `least`, '4,16' -> [4, 16]."""
    def parse(text):
        try:
            values = [int(value) for value in text.split(",")]
        except ValueError:
            values = [least - 1]
        if min(values) < least:
            raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers of at least {least}, "
                                             f"not {text!r}")
        return values
    return parse


def positive(text):
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}")
    return value


def run_checked(args, check, run):
    """A benchmark's exit status: check(args), then run(args); bad input (a UsageError) is one `error:` line and
    exit status 2."""
    try:
        check(args)
        run(args)
    except cli.UsageError as e:
        return cli.report(e)
    return 0


def check_model(args):
    """The config builds (on the meta device) and --ckpt, when given, is a file; returns the model on the meta
    device."""
    model = cli.inspect_model(args)
    if getattr(args, "ckpt", None):
        try:
            check_file(args.ckpt, "checkpoint")
        except OSError as e:
            raise cli.UsageError(str(e)) from None
    return model


def check_steps(steps, flag="--steps", key_steps=None, script=None):
    """A DDIM step count as the sampling scripts take it (ldm.cli.check_steps) and, if given, FasterDiffusion key
    steps (of `script`'s --key_steps) that fit it."""
    try:
        cli.check_steps("ddim", steps)
    except ValueError as e:
        raise cli.UsageError(f"{flag}: {e}") from None
    if key_steps is not None:
        refuse_auto_steps("--key_steps", key_steps, script)
        try:
            make_cache("fd", key_steps=key_steps).check(steps)
        except ValueError as e:
            raise cli.UsageError(cli.first_line(e)) from None
