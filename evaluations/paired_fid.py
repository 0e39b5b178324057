"""Is one sampler's FID better than another's beyond noise? A paired bootstrap of the FID difference.

Usage: python evaluations/paired_fid.py REF.npz A.npz B.npz [--inception_path G.pb] [--resamples 200]

A and B must be paired: the same number of samples, made from the same seeds (sample i of A and of B share their
label and initial noise, as `scripts/image_sample.py` draws them; where both files hold labels in arr_1 they must
match). Each resample draws sample indices with replacement, the same indices for A and B, and recomputes both
FIDs against the reference; the 2.5 and 97.5 percentiles of FID(A) - FID(B) over the resamples are a 95%
interval for the difference. Prints FID(A), FID(B), the difference and the interval on one line.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluator  # noqa: E402


def paired_bootstrap(acts_a, acts_b, ref_stats, resamples=200, seed=0, level=0.95):
    """(FID(a), FID(b), FID(a) - FID(b), (low, high)): the interval of the difference over paired resamples of
    the rows of the pool features acts_a and acts_b."""
    if len(acts_a) != len(acts_b):
        raise evaluator.InputError(f"the batches are not paired: {len(acts_a)} and {len(acts_b)} samples")

    def fid(acts):
        return evaluator.FIDStatistics.from_activations(acts).frechet_distance(ref_stats)

    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(resamples):
        rows = rng.integers(0, len(acts_a), len(acts_a))
        differences.append(fid(acts_a[rows]) - fid(acts_b[rows]))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    fid_a, fid_b = fid(acts_a), fid(acts_b)
    return fid_a, fid_b, fid_a - fid_b, (float(low), float(high))


def read_labels(path):
    """The labels of a batch (arr_1), or None."""
    with evaluator.reading_npz(path), np.load(path) as batch:
        return batch["arr_1"] if "arr_1" in batch.files else None


def sample_count(path):
    """The number of images in arr_0, from its header."""
    with evaluator.NpzArrayReader(path, "arr_0") as reader:
        return len(reader)


def check_paired(path_a, path_b):
    """Paired batches hold as many samples of one size, and the same labels (arr_1) where both hold labels."""
    count_a, count_b = sample_count(path_a), sample_count(path_b)
    if count_a != count_b:
        raise evaluator.InputError(f"the batches are not paired: {path_a} holds {count_a} samples, "
                                   f"{path_b} {count_b}")
    size_a, size_b = evaluator.image_size(path_a), evaluator.image_size(path_b)
    if size_a != size_b:
        raise evaluator.InputError(f"the batches are not paired: {path_a} holds {size_a[0]}x{size_a[1]} images, "
                                   f"{path_b} {size_b[0]}x{size_b[1]}")
    labels_a, labels_b = read_labels(path_a), read_labels(path_b)
    if labels_a is not None and labels_b is not None and not np.array_equal(labels_a, labels_b):
        raise evaluator.InputError(f"the batches are not paired: {path_a} and {path_b} have different labels")


def check_numbers(args):
    """--resamples, --seed and --tf_threads, before any work."""
    if args.resamples < 2:
        raise evaluator.InputError(f"--resamples must be at least 2, not {args.resamples}")
    if args.seed < 0:
        raise evaluator.InputError(f"--seed must be at least 0, not {args.seed}")
    evaluator.check_tf_threads(args.tf_threads)


@evaluator.stopped_in_one_line
def main(argv=None):
    parser = evaluator.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_batch", help="reference batch .npz")
    parser.add_argument("batch_a", help="sample batch A .npz")
    parser.add_argument("batch_b", help="sample batch B .npz, from the same seeds as A")
    parser.add_argument("--inception_path", help="the feature graph (default: the Inception graph, fetched once)")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--tf_threads", type=int, default=None,
                        help="TensorFlow intra/inter-op threads (default or 0: TensorFlow's choice)")
    args = parser.parse_args(argv)
    try:
        check_numbers(args)
        for path in (args.batch_a, args.batch_b):
            evaluator.check_batch_file(path)
        check_paired(args.batch_a, args.batch_b)
        # the reference batch, the graph (fetched if needed) and the reference statistics' sizes, as the evaluator
        network = evaluator.prepare(argparse.Namespace(ref_batch=args.ref_batch, sample_batch=None, json=None,
                                                       inception_path=args.inception_path, batch_size=64,
                                                       tf_threads=args.tf_threads),
                                    metrics=("FID",), other_batches=(args.batch_a, args.batch_b))
        try:
            evaluator.warn_if_sizes_differ(args.ref_batch, args.batch_a)  # both checked by now
            ref_acts = network.read_activations(args.ref_batch)
            ref_stats = evaluator.read_statistics(args.ref_batch, ref_acts)[0]
            acts_a, acts_b = (network.read_activations(path)[0] for path in (args.batch_a, args.batch_b))
        finally:
            network.close()
        try:
            fid_a, fid_b, difference, (low, high) = paired_bootstrap(acts_a, acts_b, ref_stats, args.resamples,
                                                                     args.seed)
        except evaluator.IllConditionedError as e:
            raise evaluator.ill_conditioned_error(e, (args.ref_batch, args.batch_a)) from None
    except (evaluator.InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"FID A {fid_a:.4g}, FID B {fid_b:.4g}, A - B {difference:+.4g}, 95% interval [{low:+.4g}, {high:+.4g}] "
          f"({args.resamples} paired resamples of {len(acts_a)} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
