"""Peak memory of scripts/image_sample.py for growing --num_samples: with streamed shards it stays flat.

    python benchmarks/bench_sample_memory.py [--num_samples 16,64,256,1024] [--batch_size 4] [--processes 1]
                                             [--latent_size 64]

Runs the sampling script on the tiny test model (by default) once per sample count and prints a table of
the peak resident memory of the largest process (getrusage of the finished child), next to the size of the
images, which a script that gathers them all in memory (as the published one does) needs on top, twice while
concatenating. Memory does not depend on the number of DDIM steps, so few are used. --latent_size runs the
tiny model at another latent size (64 gives 256x256 images, as cin256-v2 does; much slower).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from common import at_least, check_model, check_steps, run_checked, whole_numbers
from ldm import cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny"
MIB = 2**20


def peak_rss(cmd, log):
    """Run cmd from the repo root; returns (exit status, peak RSS in bytes of it or its largest child, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start  # Linux reports KiB


def measure(args, n, config_path, tmp):
    """One sampling run of n images; returns a table row."""
    out_dir = Path(tmp) / f"n{n}"
    cmd = [sys.executable, "scripts/image_sample.py", "--config_path", config_path, "--model_path", args.model_path,
           "--num_samples", str(n), "--batch_size", str(args.batch_size), "--ddim_steps", str(args.ddim_steps),
           "--tqdm_disable", "true", "--output_dir", str(out_dir)]
    if args.processes > 1:
        cmd = [str(mpiexec()), "-n", str(args.processes), *cmd]
    with open(Path(tmp) / "log.txt", "w+") as log:
        status, rss, seconds = peak_rss(cmd, log)
        if status != 0:
            log.seek(0)
            sys.exit(f"image_sample.py failed (exit {status}):\n{log.read()}")
    npz = next(out_dir.glob("samples_*.npz"))
    height, width, channels = map(int, npz.stem.split("x")[1:])
    return (f"| {n} | {height}x{width} | {n * height * width * channels / MIB:.2f} | {npz.stat().st_size / MIB:.2f} "
            f"| {rss / MIB:.0f} | {seconds:.1f} |")


def mpiexec():
    return Path(sys.executable).parent / "mpiexec"


def check_args(args):
    """Bad flags as a UsageError, before any sampling run (which runs from the repo root)."""
    check_steps(args.ddim_steps, "--ddim_steps")
    check_model(argparse.Namespace(config=str(REPO / args.config_path), ckpt=str(REPO / args.model_path)))
    if args.processes > 1 and not mpiexec().is_file():
        raise cli.UsageError(f"--processes {args.processes} runs under {mpiexec()}, which is not installed")


def run(args):
    print(f"image_sample.py, {args.processes} process(es), batch {args.batch_size}, {args.ddim_steps} DDIM steps, "
          f"model {Path(args.model_path).name}, latent size {args.latent_size or 'as configured'}")
    print("| num_samples | image | images (MiB) | output .npz (MiB) | peak RSS (MiB) | wall (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        config_path = args.config_path
        if args.latent_size:
            config = OmegaConf.load(config_path)
            config.model.params.image_size = args.latent_size
            config_path = str(Path(tmp) / "config.yaml")
            OmegaConf.save(config, config_path)
        for n in args.num_samples:
            print(measure(args, n, config_path, tmp), flush=True)


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_samples", type=whole_numbers(1), default="16,64,256,1024",
                        help="comma-separated sample counts")
    parser.add_argument("--batch_size", type=at_least(1), default=4)
    parser.add_argument("--ddim_steps", type=int, default=2)
    parser.add_argument("--processes", type=at_least(1), default=1, help="run under mpiexec -n with this many processes")
    parser.add_argument("--latent_size", type=at_least(1), default=None, help="override the config's latent image_size")
    parser.add_argument("--config_path", default=str(TINY / "config.yaml"))
    parser.add_argument("--model_path", default=str(TINY / "model.ckpt"))
    return parser.parse_args(argv)


def main(args):
    return run_checked(args, check_args, run)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
