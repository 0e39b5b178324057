"""Half precision with stored weights against autocast and fp32, with and without channels-last: UNet forward and
short DDIM sampling, variants alternated within one run, ratios against fp32 of the same run.

Example (full cin256-v2 architecture, random weights, one image with guidance = UNet batch 2):
    python benchmarks/bench_weights.py --steps 4 --repeats 3
"""
import argparse
import copy
import sys

import torch

from common import (at_least, build_model, check_model, check_steps, device_name, on_off, print_table, run_checked,
                    timed)
from ldm import cli
from ldm.models.diffusion.cache import SamplerStats, UNetCalls
from ldm.sampling import num_classes, sample_generators, sample_labels, sample_latents, unconditional_class
from ldm.util import optimize_for_inference, store_weights


def variants(model, half, channels_last):
    """label -> (model, precision): fp32, half under autocast, half with stored weights (and each in NHWC)."""
    stored = store_weights(copy.deepcopy(model), half)
    table = {"fp32": (model, "fp32"), f"{half} autocast": (model, half), f"{half} stored": (stored, half)}
    if channels_last:
        nhwc = optimize_for_inference(copy.deepcopy(model), channels_last=True)
        nhwc_stored = optimize_for_inference(copy.deepcopy(stored), channels_last=True)
        table.update({"fp32 NHWC": (nhwc, "fp32"), f"{half} autocast NHWC": (nhwc, half),
                      f"{half} stored NHWC": (nhwc_stored, half)})
    return table


def rel_dev(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_args(args):
    """Bad flags as a UsageError, before any model work."""
    check_steps(args.steps)
    device = cli.resolve_device(args.device)
    cli.check_precision_is_fast("bf16", device, "the CPU's half precision,", "measure it on a CPU with them")
    check_model(args)


@torch.inference_mode()
def run(args):
    device = torch.device(args.device)
    half = "fp16" if device.type == "cuda" else "bf16"
    base = build_model(args.config, args.ckpt, device)
    table = variants(base, half, args.channels_last)
    labels = sample_labels(0, range(args.batch), num_classes(base))
    rows = 2 * args.batch
    x = torch.randn(rows, base.channels, base.image_size, base.image_size, device=device)
    t = torch.full((rows,), 500, device=device)
    classes = torch.cat([labels, torch.full_like(labels, unconditional_class(base))]).to(device)
    context = base.get_learned_conditioning({base.cond_stage_key: classes})

    def forward(model, precision):
        return UNetCalls(model, precision, SamplerStats()).full(x, t, context)

    def sample(model, precision):
        return sample_latents(model, labels, args.steps, 1.5, precision=precision,
                              generators=sample_generators(0, range(args.batch)))[0]

    forward_s = {label: [] for label in table}
    sample_s = {label: [] for label in table}
    latents = {}
    for label, (model, precision) in table.items():  # warm-up, and the latents to compare
        forward(model, precision)
        latents[label] = sample(model, precision)
    for _ in range(args.repeats):
        for label, (model, precision) in table.items():  # alternated: machine noise hits every variant alike
            forward_s[label].append(timed(lambda: forward(model, precision), device)[1])
            sample_s[label].append(timed(lambda: sample(model, precision), device)[1] / args.batch)
    best = {label: (min(forward_s[label]), min(sample_s[label])) for label in table}
    result = []
    for label in table:
        f, s = best[label]
        autocast = latents[f"{half} autocast" + (" NHWC" if label.endswith("NHWC") else "")]
        same = "-" if "stored" not in label else "yes" if torch.equal(latents[label], autocast) else \
            f"{rel_dev(latents[label], autocast):.1e}"
        result.append([label, f"{f:.3f}", f"{best['fp32'][0] / f:.2f}x", f"{s:.3f}", f"{best['fp32'][1] / s:.2f}x",
                       f"{rel_dev(latents[label], latents['fp32']):.2e}", same])
    print(f"{device_name(device)}; {args.config}; UNet forward at batch {rows} ({args.batch} image(s) with guidance); "
          f"DDIM S={args.steps}, guidance 1.5; fastest of {args.repeats} alternating runs")
    print_table(["variant", "s/forward", "vs fp32", "s/img sampling", "vs fp32", "latents vs fp32 (rel. L2)",
                 "latents equal to autocast"], result)


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--ckpt", default=None, help="checkpoint; random weights when omitted")
    parser.add_argument("--batch", type=at_least(1), default=1, help="images (UNet rows: twice as many, with guidance)")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps of the sampling runs")
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--channels_last", type=on_off, default=True, metavar="on|off", help="NHWC variants too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(args):
    return run_checked(args, check_args, run)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
