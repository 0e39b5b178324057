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

from common import build_model, device_name, print_table, synchronize
from ldm.models.diffusion.faster_diffusion import FasterDiffusion
from ldm.sampling import num_classes, sample_generators, sample_labels, sample_latents


class Stop(Exception):
    pass


def run_child(args):
    """One mode in this process; prints a JSON line with peak memory and seconds per step."""
    model = build_model(args.config, args.ckpt, args.device)
    plan = None
    if args.child != "ddim":
        plan = FasterDiffusion(args.key_steps, max_decoder_batch=int(args.child) or None)
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


def main(args):
    modes = ["ddim"] + [str(c) for c in args.chunks.split(",")]
    results = {}
    for mode in modes:
        command = [sys.executable, __file__, "--child", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "chunks") and v is not None]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--stop_after", type=int, default=55)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--key_steps", default="ldm250")
    parser.add_argument("--chunks", default="0,8,4", help="max_decoder_batch values to try (0: no chunking)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run_child(args) if args.child else main(args)
