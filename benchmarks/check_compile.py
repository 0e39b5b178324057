"""torch.compile and channels-last against eager fp32: same latents up to float rounding, the compile time, and the
time of a sampling call.

Example (GPU):
    python benchmarks/check_compile.py --config configs/latent-diffusion/cin256-v2.yaml --steps 50
    python benchmarks/check_compile.py ... --inductor freezing=True     # compiled with an inductor option
"""
import argparse
import copy
import sys

import torch

from common import (add_inductor_argument, at_least, build_model, check_model, check_steps, describe_options,
                    device_name, inductor_options, print_table, run_checked, timed)
from ldm import cli
from ldm.compile import compile_unet, mode_buckets, use_compile_cache, warm_up
from ldm.models.diffusion.modes import make_mode
from ldm.sampling import num_classes, sample_generators, sample_labels, sample_latents
from ldm.util import optimize_for_inference


def check_args(args):
    """Bad flags as a UsageError, before any model work."""
    check_steps(args.steps, key_steps=args.key_steps, script="check_compile.py")
    cli.resolve_device(args.device)
    check_model(args)


def run(args):
    cache = use_compile_cache()
    eager = build_model(args.config, args.ckpt, args.device)
    labels = sample_labels(0, range(args.batch), num_classes(eager))
    mode = make_mode("ddim", "fd", key_steps=args.key_steps)
    buckets = mode_buckets([mode], args.steps, 2 * args.batch)
    variants = {"eager": eager,
                "channels_last": optimize_for_inference(copy.deepcopy(eager), channels_last=True),
                "compile": compile_unet(copy.deepcopy(eager), buckets)}
    results = {}
    for name, model in variants.items():
        compile_seconds = None
        run = lambda: sample_latents(model, labels, args.steps, 1.5, mode=mode,
                                     generators=sample_generators(0, range(args.batch)))[0]
        with inductor_options(args.inductor):
            if name == "compile":
                _, compile_seconds = warm_up(model, [mode], args.steps, args.batch, True, "fp32", buckets)
            _, first = timed(run, args.device)
            latents, seconds = timed(run, args.device)
        results[name] = latents, compile_seconds, first, seconds
    reference = results["eager"][0].double()
    rows = [[name, "" if compile_s is None else f"{compile_s:.1f}", f"{first:.2f}", f"{seconds:.3f}",
             f"{((lat.double() - reference).norm() / reference.norm()).item():.2e}"]
            for name, (lat, compile_s, first, seconds) in results.items()]
    print(f"{device_name(args.device)}; {args.config}; FD {args.key_steps}, S={args.steps}, batch {args.batch}, fp32; "
          f"inductor: {describe_options(args.inductor)}; compile cache {cache}")
    print_table(["variant", "compile s", "first call s", "second call s", "latents vs eager (rel. L2)"], rows)


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=at_least(1), default=4)
    parser.add_argument("--key_steps", default="uniform:5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_inductor_argument(parser)
    return parser.parse_args(argv)


def main(args):
    return run_checked(args, check_args, run)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
