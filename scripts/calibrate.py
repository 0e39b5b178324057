"""Choose K key steps (FasterDiffusion) or full steps (DeepCache) for a model: those that keep the cached sampler
closest to its solver.

    python scripts/calibrate.py --config models/digits32/config.yaml --ckpt models/digits32/model.safetensors \
        --steps 50 --scale 1.5 -K 10 [--cache deepcache] [--out outputs/calibration/digits32_fd_S50_K10.json]

Runs the whole UNet at every step for a few samples (labels and noise of sample indices 0..n-1 of --seed, as
scripts/image_sample.py draws them) and measures the change of the cached feature from step to step (encoder
skips and middle for FasterDiffusion, the deep decoder feature for DeepCache); K steps that spread that change
evenly, and K evenly spaced steps, are the starts of a search that moves one step at a time while the final
latents sampled with the cache get closer to those of the solver alone (--search_samples samples;
ldm/calibration.py says how). Writes a JSON file that `--key_steps @FILE.json` (or `--full_steps @FILE.json`)
reads, and a PNG of the change curve with the chosen steps marked; prints the steps.
"""
from ldm.startup import start_front_end

start_front_end(__name__)  # before torch loads: Ctrl-C meanwhile is one line; OpenMP threads wait passively

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ldm import cli  # noqa: E402
from ldm.distributed import share_cpu_threads  # noqa: E402
from ldm.calibration import (CALIBRATION_SAMPLES, SEARCH_SAMPLES, calibrated_caches,  # noqa: E402
                             CalibrationError, cached_at, calibrate, check_count, group_costs)
from ldm.models.diffusion.caches import CACHES  # noqa: E402
from ldm.models.diffusion.modes import SOLVERS, make_mode  # noqa: E402
from ldm.util import file_sha256, model_name, write_atomic  # noqa: E402


def check_args(args):
    """Everything that needs no weights; returns (mode, JSON path, PNG path)."""
    cli.apply_mode_flag(args)  # --mode SOLVER+CACHE[,OPTION=VALUE...][@S]: the flags it names
    if args.cache not in calibrated_caches():
        raise cli.UsageError(f"--mode: cache {args.cache!r} takes no calibrated steps; calibrate one of "
                             f"{', '.join(calibrated_caches())}")
    cli.check_files(args)
    cli.check_sampling(args)
    owners, _ = cli.option_owners("branch")
    if "branch" in args.given and args.cache not in owners:
        raise cli.UsageError(f"--branch is a {CACHES[owners[0]].title} option: add --cache {owners[0]} "
                             f"(the cache is {args.cache})")
    try:
        mode = make_mode(args.sampler, eta=args.eta)
        check_count(args.K, args.steps)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    for flag, value in (("--num_samples", args.num_samples), ("--search_samples", args.search_samples)):
        if value < 1:
            raise cli.UsageError(f"{flag} must be at least 1, not {value}")
    out = args.out or (f"outputs/calibration/{model_name(args.config)}_{args.cache}_S{args.steps}_K{args.K}"
                       f"_scale{args.scale:g}.json")
    plot = args.plot or str(Path(out).with_suffix(".png"))
    for path, ext, flag in ((out, ".json", "--out"), (plot, ".png", "--plot")):
        if Path(path).suffix.lower() != ext:
            raise cli.UsageError(f"{flag} {path}: the file name must end in {ext}")
        if os.path.isdir(path):
            raise cli.UsageError(f"{flag} {path} is a directory: give a file name")
        cli.check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)
    model = cli.inspect_model(args)
    if args.cache == "deepcache":
        try:
            model.model.diffusion_model.check_branch(args.branch)
        except ValueError as e:
            raise cli.UsageError(f"--branch: {e}") from None
    cli.check_device(args)
    return mode, out, plot


def plot_changes(record, path):
    """The change curve with the chosen steps marked, as a PNG."""
    change, keys = record["change"], record["steps"]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    ax.plot(range(1, len(change)), change[1:], color="tab:blue", lw=1.2, marker=".", ms=3,
            label=f"change of the {record['feature']} feature from the previous step")
    for k in keys:
        ax.axvline(k, color="tab:red", lw=0.7, alpha=0.6)
    ax.plot(keys, [change[k] for k in keys], "v", color="tab:red", ms=6, label=f"the {len(keys)} chosen steps")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("loop index (0 = noisiest step)")
    ax.set_ylabel("relative change")
    ax.set_xlim(-0.5, len(change) - 0.5)
    distance = record["distance"]
    ax.set_title(f"{record['model']['config']}: {record['sampler']}+{record['cache']}, S={record['S']}, guidance "
                 f"{record['guidance']:g}; distance from the solver {distance['steps']:.3g} (evenly spaced: "
                 f"{distance['uniform_steps']:.3g}, even change: {distance['change_steps']:.3g})", fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


@cli.one_line_failures
def main(argv=None):
    args = parse_args(argv)
    share_cpu_threads()  # no more threads than the cores this process may use
    try:
        mode, out, plot = check_args(args)
        model = cli.load(args, cli.check_device(args))
        feature = CACHES[args.cache].feature
        branched = args.cache in cli.option_owners("branch")[0]
        cached = cached_at(mode, args.cache, **({"branch": args.branch} if branched else {}))
        found = calibrate(model, mode, cached, args.steps, args.scale, feature, args.K, args.branch, args.precision,
                          args.num_samples, args.search_samples, args.seed)
    except (cli.UsageError, CalibrationError) as e:
        return cli.report(e)
    change, keys = found["change"], found["steps"]
    record = {
        "model": {"config": args.config, "checkpoint": args.ckpt, "checkpoint_sha256": file_sha256(args.ckpt)},
        "S": args.steps, "sampler": args.sampler, "eta": args.eta, "guidance": args.scale, "K": args.K,
        "steps": keys, "feature": feature, "cache": args.cache, "branch": args.branch if branched else None,
        "num_samples": args.num_samples, "search_samples": args.search_samples, "seed": args.seed,
        "precision": args.precision, "distance": found["distance"],
        "change_steps": found["change_steps"], "uniform_steps": found["uniform_steps"],
        "group_change": group_costs(change, keys), "uniform_group_change": group_costs(change, found["uniform_steps"]),
        "change": change,
    }
    for path in (out, plot):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot_changes(record, plot)
    write_atomic(out, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    distance = record["distance"]
    print(f"distance from the solver {distance['steps']:.4g} (K={args.K} evenly spaced steps: "
          f"{distance['uniform_steps']:.4g}, spreading the change: {distance['change_steps']:.4g}); plot {plot}")
    print(f"wrote {out}: use --{CACHES[args.cache].steps_option} @{out}")
    print(f"steps: {','.join(map(str, keys))}")
    return 0


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_model_args(parser)
    cli.add_sampling_args(parser)
    cli.add_device_args(parser)
    group = parser.add_argument_group("calibration")
    group.add_argument("-K", "--num_key_steps", dest="K", type=int, required=True, help="steps to choose (1..S)")
    group.add_argument("--mode", default=None, metavar="MODE",
                       help="the solver, cache and their options in one mode string, e.g. dpmpp2m+deepcache,branch=1@20 "
                            "(instead of --sampler, --cache, --branch, --eta, --steps)")
    group.add_argument("--cache", choices=list(calibrated_caches()), default="fd",
                       help="; ".join(f"{name}: the {feature} feature ({CACHES[name].steps_option})"
                                      for name, feature in calibrated_caches().items()))
    group.add_argument("--sampler", choices=list(SOLVERS), default="ddim", help="the solver whose trajectory is measured")
    group.add_argument("--branch", type=int, default=0, help="DeepCache's shallow branch (its deep feature is measured)")
    group.add_argument("--num_samples", type=int, default=CALIBRATION_SAMPLES,
                       help="samples of the change curve (indices 0..n-1 of --seed)")
    group.add_argument("--search_samples", type=int, default=SEARCH_SAMPLES,
                       help="samples of the distance that the search minimises (indices 0..n-1 of --seed)")
    group.add_argument("--out", default=None,
                       help="JSON file (default outputs/calibration/<model>_<cache>_S<S>_K<K>_scale<s>.json)")
    group.add_argument("--plot", default=None, help="PNG of the change curve (default: --out with .png)")
    parser.set_defaults(steps=50)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
