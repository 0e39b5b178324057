"""Peak memory and time of the VQ decoding of a batch of latents: whole, or in chunks of DECODE_BATCH images.

    python benchmarks/bench_decode_memory.py [--config configs/latent-diffusion/cin256-v2.yaml] [--batches 4,16,32]

Random weights, strict fp32 (no TF32 on a GPU, so that the check below means float rounding). Peak memory is
above what was in use before the decoding: the allocator's peak on a GPU, the resident set size (sampled) on the
CPU. Both ways decode the same images, to float rounding (checked: relative L2 difference under 1e-5, the tests'
float32 tolerance; convolution libraries pick other kernels for other batch sizes: up to 2e-6 apart on the CPU).
"""
import argparse
import sys

import torch

from common import (PeakMemory, at_least, build_model, check_model, device_name, print_table, run_checked, timed,
                    whole_numbers)
from ldm import cli
from ldm.sampling import DECODE_BATCH, decode_latents, image_shape
from ldm.util import set_tf32


def decode_peak(model, latents, chunk, device):
    """(images, peak bytes above the memory in use before, seconds) of one decoding."""
    tracker = PeakMemory(device)
    with tracker.track():
        images, seconds = timed(lambda: decode_latents(model, latents, chunk=chunk), device)
    return images, tracker.peak - tracker.start, seconds


def run(args):
    set_tf32(False)
    model = build_model(args.config, device=args.device)
    gib = 2**30
    rows = []
    for batch in args.batches:
        torch.manual_seed(batch)
        latents = torch.randn(batch, model.channels, model.image_size, model.image_size, device=args.device)
        chunked, chunked_peak, chunked_s = decode_peak(model, latents, args.chunk, args.device)
        whole, whole_peak, whole_s = decode_peak(model, latents, batch, args.device)
        difference = ((whole - chunked).norm() / whole.norm()).item()
        if difference > 1e-5:
            raise SystemExit(f"error: at batch {batch}, decoding in chunks of {args.chunk} changed the images "
                             f"by {difference:.3g} (relative L2)")
        rows.append([batch, f"{whole_peak / gib:.2f}", f"{chunked_peak / gib:.2f}", f"{whole_peak / batch / gib:.3f}",
                     f"{whole_s / batch:.3f}", f"{chunked_s / batch:.3f}"])
        del latents, chunked, whole
    height, width, _ = image_shape(model)
    print(f"{device_name(args.device)}; {args.config}; VQ decoding of {height}x{width} images, fp32, random weights; "
          f"chunks of {args.chunk}")
    print_table(["batch", "whole: peak GiB", "chunked: peak GiB", "whole: GiB/img", "whole: s/img", "chunked: s/img"],
                rows)


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--batches", type=whole_numbers(1), default=[4, 16, 32])
    parser.add_argument("--chunk", type=at_least(1), default=DECODE_BATCH)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def check_args(args):
    """Bad flags as a UsageError, before any model work."""
    cli.resolve_device(args.device)
    check_model(args)


def main(args):
    return run_checked(args, check_args, run)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
