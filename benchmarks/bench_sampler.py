"""Time plain DDIM against FasterDiffusion, alternating modes, and print a table per image.

Example (full cin256-v2 architecture, random weights):
    python benchmarks/bench_sampler.py --steps 20 --batch 1 --scale 1.5 --key_steps uniform:4
"""
import argparse
import statistics

import torch

from common import PeakMemory, build_model, device_name, print_table, timed
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.sampling import sample_generators, sample_labels, sample_latents
from ldm.util import optimize_for_inference


def parse_mode(spec, args):
    """'ddim:fp32' or 'fd:bf16' -> (label, FasterDiffusion or None, precision)."""
    kind, _, precision = spec.partition(":")
    precision = precision or "fp32"
    if kind == "ddim":
        return f"DDIM {precision}", None, precision
    if kind in ("fd", "fd-ref"):
        plan = FasterDiffusion(args.key_steps, context_layout="reference" if kind == "fd-ref" else "paired",
                               max_decoder_batch=args.max_decoder_batch, noise_injection=True)
        return f"{'FD-ref' if kind == 'fd-ref' else 'FD'} {args.key_steps} {precision}", plan, precision
    raise ValueError(f"unknown mode {spec!r}: use ddim:PREC, fd:PREC or fd-ref:PREC")


def main(args):
    torch.set_grad_enabled(False)
    model = optimize_for_inference(build_model(args.config, args.ckpt, args.device),
                                   channels_last=args.channels_last, compile=args.compile)
    modes = [parse_mode(m, args) for m in args.modes.split(",")]
    labels = sample_labels(args.seed, range(args.batch))
    times = {label: [] for label, _, _ in modes}
    peaks, stats = {}, {}
    memory = PeakMemory(args.device)
    for repeat in range(args.warmup + args.repeats):
        for label, plan, precision in modes:  # alternate so that machine noise hits every mode alike
            run = lambda: sample_latents(model, labels, args.steps, args.scale, faster_diffusion=plan, precision=precision,
                                   generators=sample_generators(args.seed, range(args.batch)))
            with memory.track():
                (_, intermediates), seconds = timed(run, args.device)
            if repeat >= args.warmup:
                times[label].append(seconds / args.batch)
                peaks[label] = max(peaks.get(label, 0), memory.peak)
            stats[label] = intermediates["stats"]
    base = statistics.median(times[modes[0][0]])
    rows = []
    for label, _, _ in modes:
        per_image = statistics.median(times[label])
        rows.append([label, f"{per_image:.3f}", f"{base / per_image:.2f}x", stats[label].encoder_passes,
                     stats[label].decoder_rows, f"{peaks[label] / 2**30:.2f}"])
    print(f"{device_name(args.device)}; {args.config}; S={args.steps}, batch {args.batch}, guidance {args.scale}, "
          f"max_decoder_batch {args.max_decoder_batch}, channels_last {args.channels_last}, compile {args.compile}; median of {args.repeats} alternating runs")
    print_table(["mode", "s/img", "speed-up", "encoder passes", "decoder rows", "peak GiB"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--ckpt", default=None, help="checkpoint; random weights when omitted")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--key_steps", default="uniform:4")
    parser.add_argument("--modes", default="ddim:fp32,fd:fp32", help="comma list of ddim|fd|fd-ref[:fp32|bf16|fp16]")
    parser.add_argument("--max_decoder_batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    main(parser.parse_args())
