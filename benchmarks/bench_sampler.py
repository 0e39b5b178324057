"""Time sampling modes (solver x cache) against the first one, alternating modes, and print a table per image.

A mode is a mode string, SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...][@S] (`ldm.models.diffusion.modes`; S, if
given, must be --steps), precision among its options: e.g. ddim+fd:0,5,10,precision=bf16. The cache options below
apply to every mode with that cache, --eta to the DDIM modes. Without --modes: plain DDIM, then --sampler
with --cache. Each mode is timed once (`ddim` and `ddim+none` are one). Bad flags are one `error:` line and exit
status 2, before any sampling.

UNet FLOPs are counted (torch.utils.flop_counter) in the warm-up run of each mode, which is not timed. The timed
runs take the modes in turn (A B C A B C ...), --repeats times; the table gives each mode's median and how far its
repeats spread, and one line under it says whether the repeats rank the modes alike or are too noisy to rank them.

Example (full cin256-v2 architecture, random weights):
    python benchmarks/bench_sampler.py --steps 20 --batch 1 --scale 1.5 --sampler dpmpp2m --cache deepcache \
        --cache_interval 5
"""
import argparse
import sys

from ldm.startup import start_front_end

start_front_end(__name__)  # before torch loads: Ctrl-C meanwhile is one line; OpenMP threads wait passively

import torch  # noqa: E402

from common import (PeakMemory, build_model, check_model, device_name, print_table, refuse_auto_steps,  # noqa: E402
                    script_args)
from ldm import cli  # noqa: E402
from ldm.distributed import share_cpu_threads  # noqa: E402
from ldm.models.diffusion.faster_diffusion import CONTEXT_LAYOUTS  # noqa: E402
from ldm.models.diffusion.guidance import unet_rows  # noqa: E402
from ldm.models.diffusion.caches import CACHES  # noqa: E402
from ldm.models.diffusion.modes import SOLVERS, mode_arguments  # noqa: E402
from ldm.models.diffusion.schedules import DPM_SKIP_TYPES  # noqa: E402
from ldm.sampling import num_classes, sample_generators, sample_labels, sample_latents  # noqa: E402
from ldm.compile import compile_unet, mode_buckets  # noqa: E402
from ldm.timing import alternate, device_clock  # noqa: E402
from ldm.util import PRECISIONS, optimize_for_inference  # noqa: E402


def parse_modes(args):
    """[(label, Mode, precision)] from --modes, or plain DDIM and --sampler/--cache, each mode once (`ddim` and
    `ddim+none` are one), checked against --steps as the sampling scripts check them (ldm.cli)."""
    specs = args.modes or ["ddim", f"{args.sampler}+{args.cache}"]
    flags = script_args(args, ckpt=args.ckpt or "")
    modes = {}
    for spec in specs:
        refuse_auto_steps("--modes", spec, "bench_sampler.py")
        try:
            precision = mode_arguments(spec)["precision"] or args.precision
        except (ValueError, TypeError) as e:
            raise cli.UsageError(cli.first_line(e)) from None
        mode = cli.make_mode(flags, spec)
        cli.check_sampling(script_args(flags, sampler=mode.sampler))  # steps for the solver, eta, scale, seed
        modes.setdefault((repr(mode), precision), (f"{mode.label} {precision}", mode, precision))
    return list(modes.values())


def check_args(args):
    """Bad flags as a UsageError, before the model is loaded; returns the modes."""
    for flag, value, least in (("--batch", args.batch, 1), ("--repeats", args.repeats, 1),
                               ("--warmup", args.warmup, 0)):
        if value < least:
            raise cli.UsageError(f"{flag} must be at least {least}, not {value}")
    for flag in ("--key_steps", "--full_steps"):
        refuse_auto_steps(flag, getattr(args, flag[2:]), "bench_sampler.py")
    modes = parse_modes(args)
    for precision in dict.fromkeys(precision for _, _, precision in modes):
        cli.check_device(script_args(args, precision=precision))
    model = check_model(args)
    for _, mode, _ in modes:
        cli.check_mode_fits(mode, model, args.steps)
    return modes


@torch.no_grad()
def bench(args, modes):
    """Time the modes and print the table."""
    model = build_model(args.config, args.ckpt, args.device)  # a checkpoint that does not load: a UsageError
    model = optimize_for_inference(model, channels_last=args.channels_last)
    if args.compile:  # compiles in the warm-up runs
        rows = unet_rows(args.batch, args.scale != 1)
        compile_unet(model, mode_buckets([mode for _, mode, _ in modes], args.steps, rows))
    labels = sample_labels(args.seed, range(args.batch), num_classes(model))

    def sample(mode, precision, count_flops=False):
        """One sampling call of the batch in the mode; returns its stats."""
        _, intermediates = sample_latents(model, labels, args.steps, args.scale, mode=mode, precision=precision,
                                          generators=sample_generators(args.seed, range(args.batch)),
                                          count_flops=count_flops)
        return intermediates["stats"]

    flops, peaks = {}, {}
    for repeat in range(args.warmup):  # untimed, the modes in turn; the first counts FLOPs
        for label, mode, precision in modes:
            stats = sample(mode, precision, count_flops=repeat == 0)
            if repeat == 0:
                flops[label] = stats.flops / args.batch
    memory = PeakMemory(args.device)

    def timed_run(label, mode, precision):
        def run():
            with memory.track():
                stats = sample(mode, precision)
            peaks[label] = max(peaks.get(label, 0), memory.peak)
            return stats
        return run

    timings, stats = alternate({label: timed_run(label, mode, precision) for label, mode, precision in modes},
                               args.repeats, device_clock(args.device))
    base_label = modes[0][0]
    base = timings.median(base_label) / args.batch
    rows = []
    for label, _, _ in modes:
        per_image = timings.median(label) / args.batch
        speedup = base / per_image
        s = stats[label]
        row = [label, f"{per_image:.3f}", f"{timings.spread(label):.0%}" if args.repeats > 1 else "-",
               f"{speedup:.2f}x"]
        if flops:
            flop_ratio = flops[base_label] / flops[label]
            row += [f"{flops[label] / 1e9:.4g}", f"{flop_ratio:.2f}x", f"{speedup / flop_ratio:.2f}"]
        rows.append(row + [s.full_passes, s.encoder_passes, s.decoder_rows, s.shallow_passes,
                           f"{peaks[label] / 2**30:.2f}"])
    header = ["mode", "s/img", "spread", "speed-up"]
    if flops:
        header += ["GFLOP/img", "FLOP ratio", "speed-up / FLOP ratio"]
    header += ["full passes", "encoder passes", "decoder rows", "shallow passes", "peak GiB"]
    print(f"{device_name(args.device)}; {args.config}; S={args.steps}, batch {args.batch}, guidance {args.scale}, "
          f"max_decoder_batch {args.max_decoder_batch}, channels_last {args.channels_last}, compile {args.compile}; "
          f"median of {args.repeats} alternating runs after {args.warmup} warm-up; spread: (max - min) / median")
    print_table(header, rows)
    if len(modes) > 1:
        print(timings.verdict())


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--ckpt", default=None, help="checkpoint; random weights when omitted")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--sampler", choices=list(SOLVERS), default="ddim")
    parser.add_argument("--cache", choices=list(CACHES), default="fd")
    parser.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                        help="SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...] ... (e.g. ddim+fd:0,5,10,precision=bf16); "
                             "overrides --sampler/--cache")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (of the DDIM modes)")
    parser.add_argument("--skip_type", choices=DPM_SKIP_TYPES, default="time_uniform", help="DPM-Solver++ spacing")
    parser.add_argument("--key_steps", default="uniform:4", help="FasterDiffusion key steps")
    parser.add_argument("--context_layout", choices=CONTEXT_LAYOUTS, default="paired", help="FasterDiffusion")
    parser.add_argument("--noise_injection", type=cli.str2bool, default=True, help="FasterDiffusion")
    parser.add_argument("--max_decoder_batch", type=int, default=None, help="FasterDiffusion")
    parser.add_argument("--cache_interval", type=int, default=5, help="DeepCache: a full step every N steps")
    parser.add_argument("--nonuniform", type=cli.str2bool, default=False, help="DeepCache")
    parser.add_argument("--pow", type=float, default=1.5, help="DeepCache, with --nonuniform")
    parser.add_argument("--full_steps", type=cli.step_list, default=None,
                        help="DeepCache: explicit full steps, e.g. 0,3,8, or @FILE.json (instead of an interval)")
    parser.add_argument("--branch", type=int, default=0, help="DeepCache shallow branch")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode, the modes in turn")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per mode; the first counts FLOPs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.full_steps is not None:
        args.cache_interval = None
    return args


def main(argv=None):
    args = parse_args(argv)
    share_cpu_threads()  # no more threads than the cores this process may use
    try:
        bench(args, check_args(args))
    except cli.UsageError as e:
        return cli.report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
