"""Time single sampling steps of the caches, alternated in one run: a whole-UNet step, DeepCache's shallow step with and
without forecasting, and adaptive DeepCache's shallow step (its probe and decision included); print each step's
median and what forecasting and the adaptive decision add.

A run's total hides a cost of 1-2% in the noise of a shared machine (benchmarks/bench_sampler.py's repeats spread by
5-9% on cin256-v2's architecture on 2 CPU cores); steps timed in turn, many times, resolve it. Forecasting's share of a
DeepCache run is (S - full steps) x its added time per shallow step over the run's time, S full steps of N at
interval N counted from the measured step times.

Example (full cin256-v2 architecture, random weights, one image with guidance, on the CPU):
    python benchmarks/bench_cache_steps.py --repeats 30
"""
import argparse
import sys

from ldm.startup import start_front_end

start_front_end(__name__)  # before torch loads: Ctrl-C meanwhile is one line; OpenMP threads wait passively

import torch  # noqa: E402

from common import at_least, build_model, device_name, print_table, run_checked  # noqa: E402
from ldm import cli  # noqa: E402
from ldm.distributed import share_cpu_threads  # noqa: E402
from ldm.models.diffusion.cache import SamplerStats, UNetCalls  # noqa: E402
from ldm.models.diffusion.ddim import make_ddim_timesteps  # noqa: E402
from ldm.models.diffusion.guidance import ClassifierFreeGuidance  # noqa: E402
from ldm.models.diffusion.modes import make_cache  # noqa: E402
from ldm.sampling import unconditional_class  # noqa: E402
from ldm.timing import alternate, device_clock  # noqa: E402
from ldm.util import optimize_for_inference  # noqa: E402

STEPS = 20
FULL = (0, 5, 10)  # full steps before the timed shallow step, so that order 2 has all its factors
TIMED = 12  # the loop index of the timed shallow step


def deepcache(**options):
    """A DeepCache plan from the registry."""
    return make_cache("deepcache", **options)


def bound(plan, model, guidance, timesteps, x, warm):
    """plan's strategy for one run, its steps `warm` taken; returns the strategy."""
    calls = UNetCalls(model, "fp32", SamplerStats())
    strategy = plan.bind(calls, guidance, timesteps, x)
    for i in warm:
        strategy(x, i)
    return strategy


@torch.inference_mode()
def bench(args):
    model = optimize_for_inference(build_model(args.config, device=args.device))
    x = torch.randn(args.batch, model.channels, model.image_size, model.image_size, device=args.device)
    labels = torch.arange(args.batch, device=args.device) % unconditional_class(model)
    cond = model.get_learned_conditioning({model.cond_stage_key: labels})
    uncond = model.get_learned_conditioning({model.cond_stage_key: torch.full_like(labels, unconditional_class(model))})
    guidance = ClassifierFreeGuidance(cond, uncond, args.scale)
    timesteps = torch.from_numpy(make_ddim_timesteps(STEPS)).flip(0).to(args.device)
    steps = {
        "whole UNet (DeepCache full step)": (bound(deepcache(full_steps=[0]), model, guidance, timesteps, x, ()), 0),
        "DeepCache shallow step": (bound(deepcache(full_steps=FULL), model, guidance, timesteps, x, FULL), TIMED),
        "DeepCache forecast 2 shallow step": (
            bound(deepcache(full_steps=FULL, forecast=2), model, guidance, timesteps, x, FULL), TIMED),
        "adaptive shallow step (probe, decision)": (
            bound(make_cache("adaptive", adaptive=float(torch.finfo(torch.float32).max)), model, guidance, timesteps,
                  x, (0,)), 1),
    }
    runs = {label: (lambda s=strategy, i=i: [s(x, i) for _ in range(args.calls)]) for label, (strategy, i) in
            steps.items()}
    for run in runs.values():  # warm-up
        run()
    timings, _ = alternate(runs, args.repeats, device_clock(args.device))
    seconds = {label: timings.median(label) / args.calls for label in runs}
    shallow = seconds["DeepCache shallow step"]
    rows = [[label, f"{s * 1e3:.2f}", f"{timings.spread(label):.0%}", f"{s / shallow:.4f}"] for label, s in seconds.items()]
    print(f"{device_name(args.device)}; {args.config}; batch {args.batch}, guidance {args.scale}; median of "
          f"{args.repeats} alternating rounds of {args.calls} steps each; spread: (max - min) / median")
    print_table(["step", "ms", "spread", "against DeepCache's shallow step"], rows)
    forecast = seconds["DeepCache forecast 2 shallow step"] - shallow
    full = len(range(0, STEPS, args.interval))
    run = full * seconds["whole UNet (DeepCache full step)"] + (STEPS - full) * shallow
    print(f"forecast 2 adds {forecast * 1e3:+.2f} ms a shallow step: {(STEPS - full) * forecast / run:+.2%} of a "
          f"DeepCache N = {args.interval} run of {STEPS} steps ({run:.3f} s); the adaptive probe and decision add "
          f"{seconds['adaptive shallow step (probe, decision)'] / shallow - 1:+.2%} to a shallow step")
    print(timings.verdict())


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=at_least(1), default=1, help="images (twice the UNet rows with guidance)")
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--interval", type=at_least(1), default=5, help="DeepCache's N for the run's share")
    parser.add_argument("--repeats", type=at_least(1), default=30, help="alternating rounds")
    parser.add_argument("--calls", type=at_least(1), default=3, help="steps timed together in a round")
    return parser.parse_args(argv)


def check(args):
    args.device = cli.check_device(argparse.Namespace(device=args.device, precision="fp32"))


def main(args):
    share_cpu_threads()
    return run_checked(args, check, bench)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
