"""UNet throughput against the machine's matmul peak, fp32 vs bf16/fp16, and what the fast modes cost in accuracy.

Example (full cin256-v2 architecture, random weights, one image with guidance = batch 2):
    python benchmarks/bench_precision.py
"""
import argparse
import os
import sys

import torch

from common import at_least, build_model, check_model, check_steps, device_name, print_table, run_checked, timed
from ldm import cli
from ldm.flops import FlopCounter
from ldm.models.diffusion.modes import make_cache
from ldm.sampling import (decode_latents, num_classes, sample_generators, sample_labels, sample_latents,
                          unconditional_class)
from ldm.util import autocast

CIN256_UNET_PARAMETERS = 400_920_579
CIN256_FORWARD_GFLOP = 417  # one cin256-v2 UNet forward at batch 2 as upstream computes it (full cross-attention)


def best_time(fn, device, repeats):
    """Fastest of `repeats` timed calls, after one untimed warm-up call."""
    fn()
    return min(timed(fn, device)[1] for _ in range(repeats))


def matmul_gflops(dtype, device, repeats, n=4096):
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / best_time(lambda: a @ b, device, repeats) / 1e9


def rel_dev(a, b):
    return (torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double())).item()


def quality_rows(name, model, steps, key_steps, fast, batch=2):
    """Relative deviation of fast-precision latents and images from fp32, for DDIM and FasterDiffusion."""
    labels = sample_labels(0, range(batch), num_classes(model))
    rows = []
    for mode, plan in (("DDIM", None), (f"FD {key_steps}", make_cache("fd", key_steps=key_steps))):
        out = {}
        for precision in ("fp32", fast):
            latents, _ = sample_latents(model, labels, steps, 1.5, faster_diffusion=plan, precision=precision,
                                        generators=sample_generators(0, range(batch)))
            out[precision] = latents, decode_latents(model, latents, precision)
        fp32_decode = decode_latents(model, out[fast][0], "fp32")
        rows.append([name, mode, fast, f"{rel_dev(out[fast][0], out['fp32'][0]):.2e}",
                     f"{rel_dev(out[fast][1], out['fp32'][1]):.2e}", f"{rel_dev(fp32_decode, out['fp32'][1]):.2e}"])
    return rows


def check_args(args):
    """Bad flags as a UsageError, before any model work."""
    if args.quality_steps:
        check_steps(args.quality_steps, "--quality_steps", key_steps="uniform:4", script="bench_precision.py")
    device = cli.resolve_device(args.device)
    cli.check_precision_is_fast("bf16", device, "the CPU's fast precision,", "measure it on a CPU with them")
    check_model(args)
    if args.tiny_config and (os.path.isfile(args.tiny_config) or "tiny_config" in args.given):
        check_model(argparse.Namespace(config=args.tiny_config, ckpt=args.tiny_ckpt))


@torch.inference_mode()
def run(args):
    device = args.device
    fast = "fp16" if torch.device(device).type == "cuda" else "bf16"
    fast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[fast]
    model = build_model(args.config, args.ckpt, device)
    unet = model.model.diffusion_model
    x = torch.randn(2, model.channels, model.image_size, model.image_size, device=device)
    t = torch.full((2,), 500, device=device)
    context = model.get_learned_conditioning({model.cond_stage_key: torch.tensor([1, unconditional_class(model)], device=device)})

    with FlopCounter() as counter:
        unet(x, t, context)
    counted = counter.flops / 1e9
    is_cin256 = sum(p.numel() for p in unet.parameters()) == CIN256_UNET_PARAMETERS
    nominal = CIN256_FORWARD_GFLOP if is_cin256 else counted
    peak = {p: matmul_gflops(d, device, args.repeats) for p, d in (("fp32", torch.float32), (fast, fast_dtype))}
    rows, seconds = [], {}
    for precision in ("fp32", fast):
        def forward():
            with autocast(precision, device):
                unet(x, t, context)
        seconds[precision] = best_time(forward, device, args.repeats)
        gflops = nominal / seconds[precision]
        rows.append([precision, f"{seconds[precision]:.3f}", f"{gflops:.4g}", f"{peak[precision]:.0f}",
                     f"{gflops / peak[precision]:.0%}", f"{seconds['fp32'] / seconds[precision]:.2f}x"])
    print(f"{device_name(device)}; {args.config}; UNet forward at batch 2: {nominal:.4g} GFLOP"
          + (f" as upstream computes it ({counted:.0f} here: single-token cross-attention is a lookup)" if is_cin256 else ""))
    print_table(["precision", "s/forward", "GFLOP/s", "matmul GFLOP/s (same dtype)", "of that matmul",
                 "speed-up vs fp32"], rows)

    quality = []
    if args.tiny_config and os.path.isfile(args.tiny_config):
        tiny = build_model(args.tiny_config, args.tiny_ckpt, device)
        quality += quality_rows("tiny fixture", tiny, 10, "uniform:3", fast)
    if args.quality_steps:
        quality += quality_rows(args.config.rsplit("/", 1)[-1], model, args.quality_steps, "uniform:4", fast)
    if quality:
        print()
        print("Deviation of the fast precision from fp32 (relative L2; guidance 1.5, batch 2)")
        print_table(["model", "sampler", "precision", "latents", "images", "images (fp32 decoding)"], quality)


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--ckpt", default=None, help="checkpoint; random weights when omitted")
    parser.add_argument("--tiny_config", default="tests/fixtures/tiny/config.yaml",
                        help="a small model's deviation rows too ('': none; the default is skipped where missing)")
    parser.add_argument("--tiny_ckpt", default="tests/fixtures/tiny/model.ckpt")
    parser.add_argument("--quality_steps", type=at_least(0), default=20,
                        help="DDIM steps of the full-model deviation runs (0: skip)")
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(args):
    return run_checked(args, check_args, run)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
