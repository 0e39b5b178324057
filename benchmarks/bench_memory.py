"""Peak memory of FasterDiffusion against plain DDIM, with and without decoder chunking.

Each mode runs in a fresh process (peak resident memory on CPU, the allocator's peak on GPU) over the
first --stop_after steps of an S-step run, which contain the plan's largest group: with the published
`ldm250` plan (S=250) that is steps 35-54, 20 steps = 40 decoder rows at batch 1 with guidance.

Example:
    python benchmarks/bench_memory.py --chunks 0,8,4
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from common import (at_least, build_model, check_model, check_steps, device_name, print_table, script_args, synchronize,
                    whole_numbers)
from ldm import cli
from ldm.models.diffusion.modes import make_cache
from ldm.sampling import num_classes, sample_generators, sample_labels, sample_latents


class Stop(Exception):
    pass


def run_child(args):
    """One mode in this process; prints a JSON line with peak memory and seconds per step."""
    model = build_model(args.config, args.ckpt, args.device)
    plan = None
    if args.child != "ddim":
        plan = make_cache("fd", key_steps=args.key_steps, max_decoder_batch=int(args.child) or None)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def stop(step, timestep, x, pred_x0):
        if step + 1 >= args.stop_after:
            raise Stop

    labels = sample_labels(0, range(args.batch), num_classes(model))
    synchronize(args.device)
    start = time.perf_counter()
    try:
        sample_latents(model, labels, args.steps, args.scale, faster_diffusion=plan,
                       generators=sample_generators(0, range(args.batch)), step_callback=stop)
    except Stop:
        pass
    synchronize(args.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "seconds_per_step": seconds / args.stop_after}))


def check_args(args):
    """Bad flags as a UsageError, before any child starts."""
    cli.check_sampling(script_args(args))  # --steps, --scale
    check_steps(args.steps, key_steps=args.key_steps, script="bench_memory.py")
    if args.stop_after is None:
        args.stop_after = min(55, args.steps)
    elif args.stop_after > args.steps:
        raise cli.UsageError(f"--stop_after must be at most --steps ({args.steps}), not {args.stop_after}")
    cli.resolve_device(args.device)
    check_model(args)


def table(args):
    modes = ["ddim"] + [str(c) for c in args.chunks]
    results = {}
    for mode in modes:
        command = [sys.executable, __file__, "--child", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "chunks", "given") and v is not None]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode:  # its last line on stderr says why: an error line, or a traceback's last line
            why = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
            print(why if why.startswith("error: ") else f"error: mode {mode}: {why}", file=sys.stderr)
            return max(child.returncode, 1)
        results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    base = results["ddim"]
    rows = []
    for mode in modes:
        r = results[mode]
        label = "DDIM" if mode == "ddim" else f"FD {args.key_steps}, max_decoder_batch {int(mode) or 'none'}"
        rows.append([label, f"{r['peak'] / 2**30:.2f}", f"{r['peak'] / base['peak']:.2f}x",
                     f"{r['seconds_per_step']:.3f}", f"{base['seconds_per_step'] / r['seconds_per_step']:.2f}x"])
    print(f"{device_name(args.device)}; {args.config}; S={args.steps}, batch {args.batch}, guidance {args.scale}; "
          f"first {args.stop_after} steps; fp32")
    print_table(["mode", "peak GiB", "vs DDIM", "s/step", "speed-up"], rows)
    return 0


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--stop_after", type=at_least(1), default=None, help="steps run (default: 55, at most S)")
    parser.add_argument("--batch", type=at_least(1), default=1)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--key_steps", default="ldm250")
    parser.add_argument("--chunks", type=whole_numbers(0), default="0,8,4",
                        help="max_decoder_batch values to try (0: no chunking)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(args):
    """The table (checked flags), or with --child one of its modes."""
    try:
        if args.child:
            run_child(args)
            return 0
        check_args(args)
    except cli.UsageError as e:
        return cli.report(e)
    return table(args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
