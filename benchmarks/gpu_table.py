"""Images/s and MFU of sampling modes at several batch sizes, in fp32 (TF32) and fp16, eager and compiled: the
table that gpu_check.sh prints.

MFU is the UNet FLOPs of an image at the row's batch size (count_flops.py: each kind of UNet call counted once on
meta tensors with torch.utils.flop_counter, times how often the mode makes it) times images/s, over the GPU's dense
tensor peak for the dtype (PEAKS; TF32 for fp32). Only sampling is timed (latents, not the VQ decoding). DDIM and
DeepCache repeat the same work every step (every N steps), so they are timed over whole periods (at least --window
image-steps and --min_seconds) and scaled to S steps; FasterDiffusion's plan is not periodic and runs all S steps.
Rows run in order of importance until --budget seconds are spent; the rest are listed as not run. Rows are printed
as they finish, so a run that is killed still leaves its rows. A row that fails (out of memory, a compile error) is
listed as failed and the others run; the exit status is 1 when no row was measured, 2 for bad flags.

    python benchmarks/gpu_table.py                                  # the GPU table (gpu_check.sh)
    python benchmarks/gpu_table.py --device cpu --steps 2 --config tests/fixtures/tiny/config.yaml \
        --precisions fp32,bf16 --batches 1,2                        # a quick dry run on the CPU
"""
import argparse
import copy
import sys
import time
import traceback

import torch

import count_flops
from common import (add_cudnn_benchmark_argument, add_inductor_argument, at_least, build_model, describe_options,
                    inductor_options, positive, refuse_auto_steps, script_args, synchronize)
from ldm import cli
from ldm.autobatch import AUTO_BATCH, auto_batch_size, use_expandable_segments
from ldm.compile import compile_unet, mode_buckets, run_mode_calls, use_compile_cache, warm_up
from ldm.models.diffusion.guidance import unet_rows
from ldm.modules.attention import ATTENTION_BACKENDS
from ldm.sampling import num_classes, sample_generators, sample_labels, sample_latents
from ldm.util import PRECISIONS, check_precision, optimize_for_inference, set_tf32, store_weights

# Dense tensor-core peaks in TFLOP/s (NVIDIA data sheets), by a part of the GPU's name; the first match counts.
# "fp32" is TF32 (what fp32 matmuls and convolutions run in with TF32 on).
PEAKS = [
    ("H100 PCIe", {"fp16": 756, "bf16": 756, "fp32": 378}),
    ("H100 NVL", {"fp16": 835, "bf16": 835, "fp32": 418}),
    ("H100", {"fp16": 989, "bf16": 989, "fp32": 495}),
    ("H200", {"fp16": 989, "bf16": 989, "fp32": 495}),
    ("GH200", {"fp16": 989, "bf16": 989, "fp32": 495}),
    ("A100", {"fp16": 312, "bf16": 312, "fp32": 156}),
]
COLUMNS = [("mode", 16), ("batch", 9), ("precision", 9), ("variant", 8), ("images/s", 9), ("s/img", 8),
           ("GFLOP/img", 9), ("TFLOP/s", 8), ("MFU", 6), ("timed steps", 11), ("compile s", 9)]
FIRST_RATE = {"fp32": 20e12, "fp16": 40e12, "bf16": 40e12}  # FLOP/s assumed before a precision's first row
MODE_NAMES = {"ddim": "ddim", "fd": "ddim+fd", "deepcache": "ddim+deepcache"}  # name -> the scripts' mode name
VARIANTS = ("eager", "compiled")


class StopSampling(Exception):
    """Raised by the step callback once the timed window is done."""


def peak_tflops(name, precision):
    """The dense peak of the named GPU for the precision, or None if the GPU is not in PEAKS."""
    return next((peaks[precision] for part, peaks in PEAKS if part in name), None)


def modes(args):
    """name -> mode: DDIM, FasterDiffusion and DeepCache (all with the DDIM solver), checked against --steps."""
    if "fd" in args.modes:
        refuse_auto_steps("--key_steps", args.key_steps, "gpu_table.py")
    flags = script_args(args, ckpt="")  # random weights: no checkpoint to check a calibration file against
    return {name: cli.make_mode(flags, MODE_NAMES[name]) for name in args.modes}


def period(name, args):
    """Steps after which the mode's work repeats; None when it does not (FasterDiffusion)."""
    return {"ddim": 1, "deepcache": args.cache_interval, "fd": None}[name]


def timed_steps(name, batch_size, args):
    """How many of the S steps to time: whole periods covering about --window image-steps, or all S."""
    every = period(name, args)
    if every is None:
        return args.steps
    wanted = max(every, round(args.window / batch_size))
    return min(args.steps, -(-wanted // every) * every)


def sample(model, mode, batch_size, stop, precision, args, every=None, min_seconds=0.0):
    """Sample the first `stop` of S steps for a batch, or with `every` more whole periods of `every` steps until
    min_seconds have passed (at most S); returns (seconds, steps run)."""
    labels = sample_labels(0, range(batch_size), num_classes(model))
    steps_run = 0

    def stop_after(step, timestep, x, pred_x0):
        nonlocal steps_run
        steps_run = step + 1
        if steps_run == args.steps or steps_run < stop:
            return
        if every is None or (steps_run % every == 0 and time.perf_counter() - start >= min_seconds):
            raise StopSampling

    synchronize(model.device)
    start = time.perf_counter()
    try:
        sample_latents(model, labels, args.steps, args.scale, mode=mode, precision=precision,
                       generators=sample_generators(0, range(batch_size)), step_callback=stop_after)
    except StopSampling:
        pass
    synchronize(model.device)  # the clock ran on the CPU, which queues GPU work ahead: wait for the steps run
    return time.perf_counter() - start, steps_run


def unmeasured(name, batch, precision, variant, why):
    """The cells of a row that has no measurement: why, in the images/s column."""
    return [name, batch, precision, variant, why] + [""] * (len(COLUMNS) - 5)


def print_row(cells, out):
    line = "| " + " | ".join(str(c).ljust(w) for c, (_, w) in zip(cells, COLUMNS)) + " |"
    for stream in (sys.stdout, out):
        if stream:
            print(line, file=stream, flush=True)


def print_header(title, out):
    for stream in (sys.stdout, out):
        if stream:
            print(title, file=stream, flush=True)
    print_row([name for name, _ in COLUMNS], out)
    print_row(["-" * w for _, w in COLUMNS], out)


class Bench:
    """The models, the per-image FLOPs of the rows, the auto batch sizes, and the time left."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.deadline = time.perf_counter() + args.budget
        self.modes = modes(args)
        self.base = optimize_for_inference(build_model(args.config, device=self.device),
                                           channels_last=args.channels_last, attention=args.attention)
        self.eager = {p: self.base if p == "fp32" else store_weights(copy.deepcopy(self.base), p)
                      for p in args.precisions}
        self.compiled = {}  # (precision, buckets) -> compiled model
        self.compile_seconds = {}
        self.rate = ({p: args.assumed_tflops * 1e12 for p in FIRST_RATE} if args.assumed_tflops
                     else dict(FIRST_RATE))
        self.meta = build_model(args.config, device="meta")  # the architecture alone, for counting FLOPs
        self.flops = {}  # (mode name, batch size) -> UNet FLOPs per image
        self.autos = {}

    def left(self):
        return self.deadline - time.perf_counter()

    def flops_per_image(self, name, batch_size):
        """UNet FLOPs per image of a mode over S steps at a batch size (count_flops.py)."""
        if (name, batch_size) not in self.flops:
            self.flops[name, batch_size] = count_flops.flops_per_image(self.meta, self.modes[name], self.args.steps,
                                                                       batch_size, self.args.scale != 1)
        return self.flops[name, batch_size]

    def batch_size(self, name, batch, precision):
        """A number, or for 'auto' the probed largest batch of the mode in the precision (eager)."""
        if batch != AUTO_BATCH:
            return int(batch)
        if (name, precision) not in self.autos:
            self.autos[name, precision] = auto_batch_size(self.eager[precision], self.modes[name], self.args.steps,
                                                          self.args.scale != 1, precision, self.args.auto_limit)
        return self.autos[name, precision]

    def model(self, name, precision, variant, batch_size):
        """The eager model, or the compiled one, warmed up (compiled) for this mode and batch size: only the shapes
        of this mode, since another mode's largest call at this batch may not fit (FasterDiffusion's decoder at
        DDIM's batch). Shapes that two modes share compile once."""
        if variant == "eager":
            return self.eager[precision]
        rows = unet_rows(batch_size, self.args.scale != 1)  # the bucket sizes depend on it only with a cap
        buckets = mode_buckets(self.modes.values(), self.args.steps, rows)
        if (precision, buckets) not in self.compiled:
            self.compiled[precision, buckets] = compile_unet(copy.deepcopy(self.eager[precision]), buckets)
        model = self.compiled[precision, buckets]
        if (name, precision, batch_size) not in self.compile_seconds:
            _, seconds = warm_up(model, [self.modes[name]], self.args.steps, batch_size, self.args.scale != 1,
                                 precision, buckets)
            self.compile_seconds[name, precision, batch_size] = seconds
        return model

    def estimate(self, name, batch_size, precision, variant):
        """Seconds a row will take (its warm-up and timed runs, and a first compile), from the rates so far."""
        stop = timed_steps(name, batch_size, self.args)
        steps = stop + min(stop, self.args.warmup_steps)
        work = self.flops_per_image(name, batch_size) * batch_size * steps / self.args.steps
        seconds = max(work / self.rate[precision], self.args.min_seconds)
        if variant == "compiled" and (name, precision, batch_size) not in self.compile_seconds:
            seconds += max(self.compile_seconds.values(), default=self.args.first_compile)
        return seconds

    def row(self, name, batch, precision, variant, gpu):
        """Measure one row; returns its cells."""
        mode, args = self.modes[name], self.args
        batch_size = self.batch_size(name, batch, precision)
        label = f"auto={batch_size}" if batch == AUTO_BATCH else str(batch_size)
        if batch_size < 1:
            return unmeasured(name, label, precision, variant, "does not fit")
        if self.estimate(name, batch_size, precision, variant) > self.left():
            return unmeasured(name, label, precision, variant, "not run: budget")
        model = self.model(name, precision, variant, batch_size)
        if variant == "eager":  # each call shape once, untimed: cuDNN's autotuner times a shape at its first call
            run_mode_calls(model, [mode], args.steps, batch_size, args.scale != 1, precision)
        stop = timed_steps(name, batch_size, args)
        sample(model, mode, batch_size, min(stop, args.warmup_steps), precision, args)
        seconds, stop = sample(model, mode, batch_size, stop, precision, args, every=period(name, args),
                                  min_seconds=args.min_seconds)
        per_image = seconds * args.steps / stop / batch_size
        flops = self.flops_per_image(name, batch_size)
        rate = flops / per_image
        self.rate[precision] = rate
        peak = peak_tflops(gpu, precision)
        compiled = self.compile_seconds.get((name, precision, batch_size)) if variant == "compiled" else None
        return [name, label, precision, variant, f"{1 / per_image:.3f}", f"{per_image:.4f}", f"{flops / 1e9:.4g}",
                f"{rate / 1e12:.3g}", f"{rate / 1e12 / peak:.1%}" if peak else "n/a", f"{stop}/{args.steps}",
                f"{compiled:.0f}" if compiled is not None else ""]


def plan(args):
    """The rows in the order they run: half precision before fp32, eager before compiled, FasterDiffusion first."""
    order = sorted(args.precisions, key=lambda p: p == "fp32")
    return [(name, batch, precision, variant) for precision in order for variant in args.variants
            for batch in args.batches for name in sorted(args.modes, key=lambda n: n != "fd")]


def check_args(args):
    """Bad flags as a UsageError, before any model is built; returns the device."""
    device = cli.resolve_device(args.device)
    for precision in args.precisions:
        try:
            check_precision(precision, device)
        except ValueError as e:
            raise cli.UsageError(f"--precisions {precision}: {e}") from None
        cli.check_precision_is_fast(precision, device, "--precisions")
    if AUTO_BATCH in args.batches and device.type != "cuda":
        raise cli.UsageError(f"--batches {AUTO_BATCH} fits the batch to a GPU's free memory: give numbers on the CPU")
    if args.assumed_tflops is not None and not args.assumed_tflops > 0:
        raise cli.UsageError(f"--assumed_tflops must be positive, not {args.assumed_tflops}")
    cli.check_sampling(script_args(args))
    modes(args)
    if args.out:
        cli.check_output_file(args.out, "--out")
    cli.inspect_model(args)
    return device


def main(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device: this table needs an NVIDIA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    try:
        device = check_args(args)
    except cli.UsageError as e:
        return cli.report(e)
    use_expandable_segments()
    set_tf32(True)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if "compiled" in args.variants:
        use_compile_cache()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    out = open(args.out, "w") if args.out else None
    bench = Bench(args)
    decoder_rows = f"at most {args.max_decoder_batch} rows" if args.max_decoder_batch else "whole groups"
    title = (f"{gpu}; {args.config}; random weights; S={args.steps}, guidance {args.scale}, FD {args.key_steps} "
             f"(decoder calls: {decoder_rows}), DeepCache N={args.cache_interval}; channels_last {args.channels_last}; "
             f"{args.attention} attention; cuDNN benchmark {args.cudnn_benchmark}; "
             f"inductor: {describe_options(args.inductor)}; fp32 with TF32 on CUDA; "
             "sampling only (no VQ decoding), GFLOP/img of the UNet")
    print_header(title, out)
    measured = 0
    for name, batch, precision, variant in plan(args):
        try:
            with inductor_options(args.inductor):
                cells = bench.row(name, batch, precision, variant, gpu)
        except Exception as e:  # one failed row (out of memory, a compile error) must not lose the others
            traceback.print_exc()
            cells = unmeasured(name, batch, precision, variant, f"failed: {type(e).__name__}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print_row(cells, out)
        measured += cells[5] != ""  # s/img, empty in unmeasured rows
    if out:
        out.close()
    if not measured:
        print("error: no row of the table was measured", file=sys.stderr)
        return 1
    return 0


def names(choices):
    """argparse type of a comma list of some of `choices`."""
    def parse(text):
        chosen = list(dict.fromkeys(name.strip() for name in text.split(",")))
        unknown = [name for name in chosen if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; choose from {', '.join(choices)}")
        return chosen
    return parse


def batches(text):
    """argparse type of --batches: a comma list of batch sizes and auto."""
    sizes = [cli.batch_size_arg(size.strip()) for size in text.split(",")]
    if any(size != AUTO_BATCH and size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes are at least 1, not {text!r}")
    return list(dict.fromkeys(map(str, sizes)))


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--modes", type=names(MODE_NAMES), default="ddim,fd,deepcache",
                        help="comma list of ddim, fd, deepcache")
    parser.add_argument("--key_steps", default="ldm250", help="FasterDiffusion key steps")
    parser.add_argument("--max_decoder_batch", type=int, default=None,
                        help="FasterDiffusion: at most this many rows per decoder call (default: a whole group)")
    parser.add_argument("--cache_interval", type=int, default=5, help="DeepCache: a full UNet pass every N steps")
    parser.add_argument("--batches", type=batches, default="1,4,16,auto",
                        help="comma list of batch sizes and auto (the largest that fits the GPU)")
    parser.add_argument("--precisions", type=names(PRECISIONS), default="fp32,fp16",
                        help=f"comma list of {', '.join(PRECISIONS)} (fp16 on a GPU only)")
    parser.add_argument("--variants", type=names(VARIANTS), default="eager,compiled",
                        help="comma list of eager, compiled")
    parser.add_argument("--window", type=at_least(1), default=100,
                        help="image-steps to time for DDIM and DeepCache (whole periods, at least one)")
    parser.add_argument("--min_seconds", type=float, default=2.0,
                        help="time DDIM and DeepCache for more whole periods until this long has passed (at most S)")
    parser.add_argument("--warmup_steps", type=at_least(0), default=5, help="untimed steps before each timed run")
    parser.add_argument("--auto_limit", type=at_least(1), default=256, help="largest batch size that auto tries")
    parser.add_argument("--budget", type=positive, default=420,
                        help="seconds from the start (building the model included); rows that would not fit are not "
                             "run")
    parser.add_argument("--first_compile", type=float, default=120,
                        help="seconds a first compile is assumed to take when planning the budget")
    parser.add_argument("--assumed_tflops", type=float, default=None,
                        help="TFLOP/s assumed when planning a precision's first row (default: 40 fp16, 20 fp32)")
    parser.add_argument("--channels_last", action="store_true", help="NHWC convolutions in every row")
    add_cudnn_benchmark_argument(parser)
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                        help="auto (as in the scripts): matmul on a GPU for heads wider than flash attention takes, "
                             "else sdpa; sdpa: PyTorch's fused kernel; matmul: scores written out, two matmuls")
    add_inductor_argument(parser)
    parser.add_argument("--out", default=None,
                        help="also write the table to this file (overwritten), row by row as rows finish: a run "
                             "stopped early keeps the rows done")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
