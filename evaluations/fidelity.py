"""How close are a sampler's outputs to a reference sampler's outputs from the same seeds? Per-pair fidelity.

Usage: python evaluations/fidelity.py BASE.npz SAMPLES.npz [--vs OTHER.npz] [--json OUT.json]
           [--inception_path GRAPH.pb] [--batch_size 500] [--resamples 1000] [--seed 0]

BASE and SAMPLES are batches written by `scripts/image_sample.py` from the same seeds: sample i of both has the
same label and initial noise (arr_0: uint8 NHWC images; arr_1: labels; optional `latents`: the final latents
[N, C, h, w]). For each pair (base i, sample i) it computes
  - PSNR in dB of the uint8 images (peak 255, over all pixels and channels; inf for identical images),
  - SSIM (scikit-image, per channel and averaged, data_range 255),
  - the feature distance ||f_base - f_sample|| / ||f_base|| of the graph's pool_3 features,
  - whether the graph's logits give both images the same class,
  - the latents' ||z_base - z_sample|| / ||z_base||, when both files hold latents,
and prints each measure's mean over the pairs with a 95% percentile-bootstrap interval, one line per measure:

    PSNR (dB): 27.31 [26.90, 27.70] (1000 pairs, 0 identical, median 27.2)
    SSIM: 0.9120 [0.9071, 0.9166]
    ...

With --vs OTHER.npz (a third batch from the same seeds) it prints a block for SAMPLES and one for OTHER, then
the paired difference SAMPLES - OTHER of each mean with an interval from the same resampled pairs for both.
The batches are read in chunks of --batch_size pairs, keeping only per-pair numbers. --json writes everything,
with inf written as the string "inf" ("-inf") and an undefined number (inf - inf) as null.
"""
import contextlib
import itertools
import math
import os
import sys
import zipfile
from typing import NamedTuple

import numpy as np
from skimage.metrics import structural_similarity
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluator  # noqa: E402

LEVEL = 0.95  # of the bootstrap intervals
GRAPH_BATCH = 64  # images per run of the feature graph
SSIM_WINDOW = 7  # scikit-image's default window: images must be at least this wide and high
PEAK = 255.0
# (key in the JSON, label of the printed line)
MEASURES = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("feature_distance", "feature distance"),
            ("same_class", "same class"), ("latent_rel_l2", "latent rel. L2"))


# ----------------------------------------------------------------------------------------------------------
# Per-pair measures


def psnr(base, images):
    """PSNR in dB of each pair of uint8 images [n, ...]: inf where the images are identical."""
    difference = np.subtract(base, images, dtype=np.int16).reshape(len(base), -1)
    squared_error = np.einsum("ij,ij->i", difference, difference, dtype=np.int64)  # exact
    mse = squared_error / difference.shape[1]
    with np.errstate(divide="ignore"):
        return 10 * np.log10(PEAK ** 2 / mse)


def ssim(base, images):
    """SSIM of each pair of uint8 HWC images (scikit-image's, per channel and averaged)."""
    return np.array([structural_similarity(a, b, channel_axis=-1, data_range=PEAK) for a, b in zip(base, images)])


def relative_l2(base, other):
    """||base - other|| / ||base|| of each pair of rows (flattened): 0 where both are 0, inf where only base is."""
    base = base.reshape(len(base), -1).astype(np.float64)
    other = other.reshape(len(other), -1).astype(np.float64)
    distance, norm = np.linalg.norm(base - other, axis=1), np.linalg.norm(base, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(distance == 0, 0.0, distance / norm)


class Chunk(NamedTuple):
    """Consecutive samples of one batch: uint8 images, their pool_3 features and classes, their latents or None."""
    images: np.ndarray
    features: np.ndarray
    classes: np.ndarray
    latents: np.ndarray | None


def pair_measures(base, sample):
    """Each measure of the pairs of two chunks, {key: [n] float64}."""
    measures = {
        "psnr": psnr(base.images, sample.images),
        "ssim": ssim(base.images, sample.images),
        "feature_distance": relative_l2(base.features, sample.features),
        "same_class": (base.classes == sample.classes).astype(np.float64),
    }
    if base.latents is not None:
        measures["latent_rel_l2"] = relative_l2(base.latents, sample.latents)
    return measures


def pool_features(network, images):
    """pool_3 features [n, d] of uint8 NHWC images, run through the graph GRAPH_BATCH images at a time."""
    runs = [network.sess.run(network.pool_features, {network.image_input: images[i:i + GRAPH_BATCH].astype(np.float32)})
            for i in range(0, len(images), GRAPH_BATCH)]
    return np.concatenate(runs).reshape(len(images), -1)


def describe(network, images, latents):
    """The Chunk of some images: their pool_3 features and classes (argmax of the logits, which the evaluator
    computes as ADM does: pool_3 times the weights of softmax/logits/MatMul, without the bias)."""
    features = pool_features(network, images)
    return Chunk(images, features, network.compute_softmax(features).argmax(axis=1), latents)


# ----------------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_means(columns, resamples, seed):
    """Column means [resamples, k] of `columns` [n, k] over resamples of its rows with replacement: resample r
    draws rng.integers(0, n, n) of numpy.random.default_rng(seed), the same rows for every column."""
    rng = np.random.default_rng(seed)
    return np.stack([columns[rng.integers(0, len(columns), len(columns))].mean(axis=0) for _ in range(resamples)])


def sorted_quantile(values, q):
    """NumPy's default (linear) q-quantile of sorted values, also between a finite and an infinite neighbour (where
    NumPy's interpolation gives NaN): the infinite one."""
    position = q * (len(values) - 1)
    below = int(position)
    low, fraction = float(values[below]), position - below
    if fraction == 0:
        return low
    high = float(values[below + 1])
    if low == high:
        return low
    if math.isinf(low) or math.isinf(high):  # the infinite neighbour (NaN between -inf and inf)
        return low + high
    return low + (high - low) * fraction


def percentile_interval(values, level=LEVEL):
    """(low, high): the percentiles that hold the central `level` share of values; NaN if any value is."""
    values = np.sort(values)
    if np.isnan(values[-1]):  # sorted last
        return math.nan, math.nan
    tail = (1 - level) / 2
    return sorted_quantile(values, tail), sorted_quantile(values, 1 - tail)


def summary(values, means):
    """Mean of a measure's per-pair values and its interval from the bootstrap means."""
    return {"mean": float(np.mean(values)), "interval": list(percentile_interval(means))}


def psnr_summary(values, means):
    """The summary of PSNR, with the number of identical pairs (PSNR inf) and the median."""
    return {**summary(values, means), "identical": int(np.isinf(values).sum()), "median": float(np.median(values))}


def difference_summary(mean_samples, mean_other, differences):
    """Difference of two means (NaN for inf - inf) with the interval of the paired bootstrap differences."""
    return {"mean": mean_samples - mean_other, "interval": list(percentile_interval(differences))}


def summarize(measures, resamples, seed):
    """Summaries of each batch's measures ({role: {key: [n]}}) as {role}_vs_base and, with a second batch, of the
    paired difference samples - other of their means: the bootstrap draws the same pairs for every measure of every
    batch."""
    columns = [(role, key) for role, by_key in measures.items() for key in by_key]
    resampled = bootstrap_means(np.stack([measures[role][key] for role, key in columns], axis=1), resamples, seed)
    means = {column: resampled[:, i] for i, column in enumerate(columns)}
    report = {f"{role}_vs_base": {key: (psnr_summary if key == "psnr" else summary)(values, means[role, key])
                                   for key, values in by_key.items()} for role, by_key in measures.items()}
    if "other" in measures:
        with np.errstate(invalid="ignore"):  # inf - inf in a resample: undefined (NaN)
            report["samples_minus_other"] = {
                key: difference_summary(report["samples_vs_base"][key]["mean"], report["other_vs_base"][key]["mean"],
                                        means["samples", key] - means["other", key])
                for key in measures["samples"]}
    return report


# ----------------------------------------------------------------------------------------------------------
# Reading and checking the batches


class Batch(NamedTuple):
    """What the checks read of a batch file: images' shape [N, H, W, 3], labels or None, latents' shape or None."""
    path: str
    shape: tuple
    labels: np.ndarray | None
    latent_shape: tuple | None


def read_batch(path):
    """Check that path is a sample batch (uint8 NHWC RGB images in arr_0, at least one; latents, if any, one float
    array per image) and read its shapes and labels; reads no image."""
    if not os.path.isfile(path):
        raise evaluator.InputError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise evaluator.InputError(f"{path}: not an .npz file")
    with evaluator.reading_npz(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        with evaluator.NpzArrayReader(path, "arr_0") as images:
            shape, dtype = tuple(images.shape), images.dtype
        check_images(path, shape, dtype)
        labels = None
        if "arr_1.npy" in names:
            with np.load(path) as batch:
                labels = batch["arr_1"]
        latent_shape = None
        if "latents.npy" in names:
            with evaluator.NpzArrayReader(path, "latents") as latents:
                latent_shape, latent_dtype = tuple(latents.shape), latents.dtype
            check_latents(path, latent_shape, latent_dtype, shape[0])
    return Batch(path, shape, labels, latent_shape)


def check_images(path, shape, dtype):
    """arr_0 holds uint8 RGB images [N >= 1, H, W, 3] large enough for SSIM's window."""
    if dtype != np.uint8:
        raise evaluator.InputError(f"{path}: arr_0 has dtype {dtype}; expected uint8 images (0..255)")
    if len(shape) != 4 or shape[3] != 3:
        raise evaluator.InputError(f"{path}: arr_0 has shape {shape}; expected [N, height, width, 3] (NHWC, RGB)")
    if shape[0] == 0:
        raise evaluator.InputError(f"{path}: arr_0 holds no images")
    if min(shape[1:3]) < SSIM_WINDOW:
        raise evaluator.InputError(f"{path}: its images are {shape[1]}x{shape[2]}; SSIM needs at least "
                                   f"{SSIM_WINDOW}x{SSIM_WINDOW}")


def check_latents(path, shape, dtype, count):
    """latents holds one float array per image."""
    if dtype.kind != "f":
        raise evaluator.InputError(f"{path}: latents has dtype {dtype}; expected floats")
    if len(shape) < 2 or shape[0] != count:
        raise evaluator.InputError(f"{path}: latents has shape {shape}; expected one array per image ({count})")


def check_paired(base, batch):
    """A batch pairs with the base: as many images of one shape, the same labels, latents of one shape in both or
    in neither."""
    def not_paired(what):
        return evaluator.InputError(f"the batches are not paired: {what}")

    if base.shape[0] != batch.shape[0]:
        raise not_paired(f"{base.path} holds {base.shape[0]} samples, {batch.path} {batch.shape[0]}")
    if base.shape[1:] != batch.shape[1:]:
        raise not_paired(f"{base.path} holds {shape_text(base.shape[1:])} images, {batch.path} "
                         f"{shape_text(batch.shape[1:])}")
    if (base.labels is None) != (batch.labels is None):
        with_labels, without = (base, batch) if batch.labels is None else (batch, base)
        raise not_paired(f"{with_labels.path} holds labels (arr_1) and {without.path} none")
    if base.labels is not None and not np.array_equal(base.labels, batch.labels):
        raise not_paired(f"{base.path} and {batch.path} have different labels (arr_1)")
    if (base.latent_shape is None) != (batch.latent_shape is None):
        with_latents, without = (base, batch) if batch.latent_shape is None else (batch, base)
        raise not_paired(f"{with_latents.path} holds latents and {without.path} none (sample both with "
                         "--save_latents, or neither)")
    if base.latent_shape is not None and base.latent_shape[1:] != batch.latent_shape[1:]:
        raise not_paired(f"{base.path} holds latents of shape {shape_text(base.latent_shape[1:])}, {batch.path} "
                         f"{shape_text(batch.latent_shape[1:])}")


def shape_text(shape):
    """A shape as 32x32x3."""
    return "x".join(str(size) for size in shape)


def read_chunks(path, batch_size, with_latents):
    """Yield (images, latents or None) of consecutive batch_size samples of a checked batch file."""
    with contextlib.ExitStack() as stack:
        images = stack.enter_context(evaluator.NpzArrayReader(path, "arr_0")).read_batches(batch_size)
        latents = itertools.repeat(None)
        if with_latents:
            latents = stack.enter_context(evaluator.NpzArrayReader(path, "latents")).read_batches(batch_size)
        for chunk_images, chunk_latents in zip(images, latents):
            if chunk_latents is not None:
                evaluator.check_finite(path, "latents", chunk_latents)
            yield chunk_images, chunk_latents


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    """The command line; a malformed one is one `error:` line and exit status 2."""
    parser = evaluator.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="reference batch .npz: the base sampler's outputs")
    parser.add_argument("samples", help="sample batch .npz from the same seeds as the base")
    parser.add_argument("--vs", metavar="OTHER", help="a second sample batch from the same seeds, ranked against "
                                                      "SAMPLES by the paired difference of each measure")
    parser.add_argument("--inception_path", help="the feature graph (default: the Inception graph, fetched once)")
    parser.add_argument("--json", help="also write every number and the input paths to this JSON file")
    parser.add_argument("--batch_size", type=int, default=500, help="pairs read at a time")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    return parser.parse_args(argv)


def check_numbers(args):
    """--batch_size, --resamples and --seed."""
    if args.batch_size < 1:
        raise evaluator.InputError(f"--batch_size must be at least 1, not {args.batch_size}")
    if args.resamples < 2:
        raise evaluator.InputError(f"--resamples must be at least 2, not {args.resamples}")
    if args.seed < 0:
        raise evaluator.InputError(f"--seed must be at least 0, not {args.seed}")


def check_inputs(args):
    """Every check that needs no TensorFlow: the numbers, the batches and their pairing, --json and
    --inception_path; returns the base Batch."""
    check_numbers(args)
    base = read_batch(args.base)
    for path in compared_paths(args).values():
        check_paired(base, read_batch(path))
    if args.json:
        evaluator.check_json_path(args.json)
    if args.inception_path:
        evaluator.check_inception_path(args.inception_path)
    return base


def compared_paths(args):
    """{role: path} of the batches compared with the base."""
    return {"samples": args.samples, **({"other": args.vs} if args.vs else {})}


def measure(network, base, paths, batch_size):
    """Per-pair measures of each batch in paths ({role: path}) against the base: {role: {key: [n]}}."""
    with_latents = base.latent_shape is not None
    readers = [read_chunks(path, batch_size, with_latents) for path in (base.path, *paths.values())]
    parts = {role: [] for role in paths}
    with tqdm(total=base.shape[0], unit="pair", disable=None) as progress:
        for (base_images, base_latents), *chunks in zip(*readers):
            base_chunk = describe(network, base_images, base_latents)
            for role, (images, latents) in zip(paths, chunks):
                parts[role].append(pair_measures(base_chunk, describe(network, images, latents)))
            progress.update(len(base_images))
    return {role: {key: np.concatenate([part[key] for part in role_parts]) for key in role_parts[0]}
            for role, role_parts in parts.items()}


def run(args):
    """Check the inputs, then measure every pair and summarize: the report that --json writes."""
    base = check_inputs(args)
    paths = compared_paths(args)
    network = evaluator.InceptionNetwork(args.inception_path or evaluator.fetch_inception_graph())
    try:
        measures = measure(network, base, paths, args.batch_size)
    finally:
        network.close()
    return {"base": args.base, **paths, "pairs": base.shape[0], "resamples": args.resamples, "seed": args.seed,
            "level": LEVEL, **summarize(measures, args.resamples, args.seed)}


def number_text(key, value, signed=False):
    """A number as printed: same class in percent, PSNR to 0.01 dB, SSIM to 4 decimals, distances to 4 digits."""
    sign = "+" if signed else ""
    if key == "same_class":
        return f"{100 * value:{sign}.1f}%"
    digits = {"psnr": ".2f", "ssim": ".4f"}.get(key, ".4g")
    return f"{value:{sign}{digits}}"


def measure_lines(summaries, pairs, signed=False, indent=""):
    """One line per measure: its mean and interval; for PSNR also the pairs, identical pairs and the median."""
    lines = []
    for key, label in MEASURES:
        if key not in summaries:
            continue
        s = summaries[key]
        low, high = (number_text(key, bound, signed) for bound in s["interval"])
        line = f"{indent}{label}: {number_text(key, s['mean'], signed)} [{low}, {high}]"
        if "identical" in s:
            line += f" ({pairs} pairs, {s['identical']} identical, median {s['median']:.1f})"
        lines.append(line)
    return lines


def report_lines(report):
    """What the command prints: the measures of SAMPLES, or with --vs a block per batch and the differences."""
    pairs = report["pairs"]
    if "other" not in report:
        return measure_lines(report["samples_vs_base"], pairs)
    return [f"{report['samples']} vs {report['base']}:",
            *measure_lines(report["samples_vs_base"], pairs, indent="  "),
            f"{report['other']} vs {report['base']}:",
            *measure_lines(report["other_vs_base"], pairs, indent="  "),
            f"{report['samples']} - {report['other']} (paired; same class in percentage points):",
            *measure_lines(report["samples_minus_other"], pairs, signed=True, indent="  ")]


def json_safe(value):
    """value with every infinite float written as "inf" or "-inf" and NaN as None, so that it is valid JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else "inf" if value > 0 else "-inf"
    return value


@evaluator.stopped_in_one_line
def main(argv=None):
    """Measure, write --json, print; returns the exit status: 0, or 2 with one `error:` line on bad input."""
    args = parse_args(argv)
    try:
        report = run(args)
        if args.json:
            evaluator.write_json(args.json, json_safe(report))
    except (evaluator.InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
