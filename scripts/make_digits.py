"""Draw a set of class-conditional 32x32 digit images into an ADM-format .npz (arr_0 uint8 NHWC, arr_1 labels).

    mkdir -p data
    python scripts/make_digits.py --num 200000 --seed 0 --out data/digits_train.npz   # a training set
    python scripts/make_digits.py --reference --out data/digits_ref.npz              # the held-out reference batch

Image i depends only on (seed, i); the reference batch uses its own seed, which a training set may not.
"""
import signal
import sys
from multiprocessing import Pool

import numpy as np

from ldm import cli
from ldm.data.digits import REFERENCE_SEED, make_digits
from ldm.util import write_atomic

REFERENCE_SIZE = 10_000


def _chunk(args):
    seed, start, stop = args
    return make_digits(seed, range(start, stop))


def _worker_signals():
    """A pool worker ends quietly at the SIGTERM with which the pool stops it, and leaves Ctrl-C to the parent
    (it inherits the parent's handlers, which raise an interrupt and print a traceback in the worker)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def draw_set(seed, num, workers=1, chunk=1000):
    """Images and labels 0..num-1 of the set made with `seed`, drawn by `workers` processes."""
    jobs = [(seed, start, min(start + chunk, num)) for start in range(0, num, chunk)]
    if workers > 1:
        with Pool(workers, initializer=_worker_signals) as pool:
            parts = pool.map(_chunk, jobs)
    else:
        parts = [_chunk(job) for job in jobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@cli.one_line_failures
def main(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--num", type=int, default=None, help=f"number of images (reference: {REFERENCE_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="seed of a training set")
    parser.add_argument("--reference", action="store_true", help=f"the held-out reference batch (seed {REFERENCE_SEED})")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.reference:
        seed, num = REFERENCE_SEED, args.num or REFERENCE_SIZE
    else:
        seed, num = args.seed, args.num
        if num is None:
            parser.error("--num is required for a training set")
        if seed == REFERENCE_SEED:
            parser.error(f"--seed {seed} is the reference batch's seed: choose another for a training set")
        if seed < 0:
            parser.error(f"--seed must be at least 0, not {seed}")
    if num < 1 or args.workers < 1:
        parser.error("--num and --workers must be positive")
    if not args.out.endswith(".npz"):
        parser.error(f"--out must end in .npz, not {args.out!r}")
    try:
        cli.check_output_file(args.out, "--out")
    except cli.UsageError as e:
        parser.error(str(e))
    images, labels = draw_set(seed, num, args.workers)
    write_atomic(args.out, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    print(f"wrote {args.out}: {num} images, seed {seed}, class counts {np.bincount(labels, minlength=10).tolist()}")


if __name__ == "__main__":
    sys.exit(main())
