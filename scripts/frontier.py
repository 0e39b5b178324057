"""The speed-quality frontier of sampling modes on one model: quality against seconds and FLOPs per image.

    python scripts/frontier.py --quick --config models/digits32/config.yaml --ckpt models/digits32/model.safetensors \
        --ref data/digits_ref.npz --inception_path models/digits32/classifier.pb --real data/digits_real.npz
    mpiexec -n 8 python scripts/frontier.py --set default ...      # sampling on 8 processes (GPUs)

Every mode is sampled with scripts/image_sample.py (the same --seed, so every mode gets the same labels and
initial noise) and scored with evaluations/evaluator.py against --ref. A mode is a mode string with its steps,
SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...]@S (`ldm.models.diffusion.modes`), e.g. ddim@50,
ddim+fd:ldm250,context_layout=reference@250, dpmpp2m+deepcache:3,nonuniform=true@20, ddim,precision=bf16@50.
--set names a list of modes (SETS); each mode runs once per --guidance value.

For each it records s/img (sampling seconds per image of one process, decoding excluded; see Timing below), UNet
FLOPs per image (torch.utils.flop_counter, one extra image), encoder passes, the five metrics and, when the feature
graph classifies the model's classes, the fraction of samples it takes for their requested class (arr_1). --real
adds held-out real images as a row, the floor: its first N images, so that it is scored on as many images as each
mode (FID's bias depends on the count); and a row of the same images through the model's first stage alone
(encoded, quantized, decoded), what the autoencoder costs before any sampling. Finished modes are not redone, and
an interrupted run continues where it stopped when the same command is run again (there is no --resume flag): the
samples are image_sample.py's resumable run in <out>/samples/n<N>_seed<seed>/<mode>_g<guidance>/, the mode's
numbers result.json beside them. Outputs: <out>/frontier.md, frontier.json and frontier.png (FID
against s/img and against FLOPs/img, Pareto fronts drawn, points numbered with a key).

Timing: once every mode is sampled, rank 0 times them all again, in turn (A B C A B C ...), --repeats rounds of one
sampling call of --timing_batch images each, after an untimed call of each kind of UNet call the mode makes; s/img
is the median of a mode's rounds, and one line in frontier.md (and frontier.json's "timing") says how far the rounds
spread, or which modes at the same guidance they cannot rank (their rounds overlap). Modes run one after another
for minutes each meet different loads on a shared machine; rounds in turn meet the same. The rounds cost
--repeats x --timing_batch images a mode (96 with the defaults: a tenth of the default 1000 samples; 32 images a
call came within about 10% of the per-image time of a 250-image batch on the CPU) instead of repeating whole runs;
the sampling run's own time is kept as run_s_per_img. A rerun with the same modes and settings keeps the rounds
in <out>/timing.json.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
import traceback
from pathlib import Path

from ldm.startup import start_front_end

start_front_end(__name__)  # before torch loads: Ctrl-C meanwhile is one line; OpenMP threads wait passively

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, FuncFormatter  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluations import evaluator, fidelity  # noqa: E402
from ldm import cli  # noqa: E402
from ldm.compile import run_mode_calls  # noqa: E402
from ldm.distributed import Comm, share_cpu_threads  # noqa: E402
from ldm.models.diffusion.modes import make_mode, mode_arguments  # noqa: E402
from ldm import sampling_run  # noqa: E402
from ldm.sampling import (image_shape, num_classes, reconstruct, sample_generators, sample_labels,  # noqa: E402
                          sample_latents)
from ldm.timing import Timings, alternate, device_clock  # noqa: E402
from ldm.util import PRECISIONS, file_sha256, model_name, write_atomic  # noqa: E402

_FD_PRESETS = [f"ddim+fd:{preset}{layout}@{s}" for s in (250,) for preset in ("ldm250", "ldm250-fast")
               for layout in ("", ",context_layout=reference")]
SETS = {
    # with --quick's 250 samples: 6.6 minutes on the small model's architecture on 2 busy CPU cores
    "quick": ["ddim@10", "ddim@25", "dpmpp2m@10", "ddim+fd:uniform:3@25", "ddim+fd:auto:9@25", "ddim+deepcache:3@25"],
    # the rows of RESULTS.md's quality table: up to 100 steps, and the 250-step ones (run with fewer samples)
    "quality": [*(f"ddim@{s}" for s in (100, 50, 25, 10)), *(f"ddim+fd:uniform:{n}@50" for n in range(2, 6))],
    "quality250": ["ddim@250", *_FD_PRESETS],
    # the frontier: solvers at several S (250-step DDIM the base of fidelity), both caches, calibrated against
    # uniform key steps at equal K
    "default": [*(f"ddim@{s}" for s in (10, 20, 25, 50, 100, 250)), *(f"dpmpp2m@{s}" for s in (5, 10, 15, 20)),
                *(p.replace("@250", "@50") for p in _FD_PRESETS),
                *(f"ddim+fd:{keys}@50" for n, k in ((2, 25), (3, 17), (4, 13), (5, 10))
                  for keys in (f"uniform:{n}", f"auto:{k}")),
                *(f"ddim+deepcache:{n}{nonuniform}@50" for n in (2, 3, 5) for nonuniform in ("", ",nonuniform=true")),
                "dpmpp2m+deepcache:2@20", "dpmpp2m+fd:uniform:2@20"],
    # the next caches against the solvers (RESULTS.md): forecasting (TaylorSeer) for both caches, adaptive refresh
    # at several thresholds, and both with DPM-Solver++; the solver rows are the default set's
    "caches": [*(f"ddim@{s}" for s in (10, 20, 25, 50, 100, 250)), *(f"dpmpp2m@{s}" for s in (5, 10, 15, 20)),
               *(f"ddim+fd:uniform:{n}{f}@50" for n in (2, 3, 5) for f in ("", ",forecast=1", ",forecast=2")),
               *(f"ddim+deepcache:{n}{f}@50" for n in (2, 3, 5) for f in ("", ",forecast=1", ",forecast=2")),
               *(f"ddim+adaptive:{d}@50" for d in (0.03, 0.05, 0.1, 0.2)),
               "dpmpp2m+deepcache:2@20", "dpmpp2m+deepcache:2,forecast=1@20", "dpmpp2m+deepcache:2,forecast=2@20",
               "dpmpp2m+fd:uniform:2@20", "dpmpp2m+fd:uniform:2,forecast=1@20", "dpmpp2m+adaptive:0.1@20"],
    # RESULTS.md's precision table: four modes in fp32 and in bf16
    "precision": [f"{mode}{dtype}@{s}" for mode, s in (("ddim", 50), ("ddim+fd:uniform:3", 50), ("dpmpp2m", 15),
                                                        ("ddim+deepcache:2", 50)) for dtype in ("", ",precision=bf16")],
    # RESULTS.md's breakdown of FasterDiffusion's cost: feature reuse and prior noise injection apart
    # (uniform:1 reuses nothing: DDIM with the injection alone; 0.000632 = 0.003 * 8 / 38 adds at S = 250 what the
    # published weight adds at S = 50)
    "injection": ["ddim@50", "ddim+fd:uniform:1@50", "ddim+fd:uniform:3,noise_injection=false@50",
                  "ddim+fd:uniform:3@50", "ddim+fd:ldm250,noise_injection=false@50", "ddim+fd:ldm250@50",
                  "ddim@250", "ddim+fd:uniform:1@250", "ddim+fd:ldm250,noise_injection=false@250",
                  "ddim+fd:ldm250,injection_scale=0.000632@250", "ddim+fd:ldm250@250"],
}
QUICK_SAMPLES, DEFAULT_SAMPLES = 250, 1000
COUNT_IMAGES = 16  # images whose UNet work is averaged for a cache that decides per sample
TIMING_BATCH = 32  # default images of a timed call (at most --batch_size)
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
# --quality: the plot's y axis and the Pareto fronts' measure: (label, whether higher is better, the row's value)
QUALITIES = {
    "fid": ("FID", False, lambda r: r.get("fid")),
    "fid_recon": ("FID against the reference's first-stage reconstructions", False, lambda r: r.get("fid_recon")),
    "psnr": ("PSNR to the base mode (dB)", True, lambda r: fidelity_mean(r, "psnr")),
    "ssim": ("SSIM to the base mode", True, lambda r: fidelity_mean(r, "ssim")),
    "feature": ("feature distance to the base mode", False, lambda r: fidelity_mean(r, "feature_distance")),
}
FIDELITY_RESAMPLES, FIDELITY_BATCH = 1000, 500


def fidelity_mean(row, key):
    """A row's mean fidelity measure to its base mode; None for the base itself, or where it was not measured."""
    measured = row.get("fidelity")
    return None if not measured or measured["base"] == row["spec"] else measured[key]["mean"]


class Job:
    """One mode at one guidance: its image_sample.py arguments and where its samples and result go."""

    def __init__(self, spec, guidance, args, cache):
        self.spec, self.guidance, self.args, self.cache = spec, guidance, args, cache
        self.folder = Path(args.output_dir)
        self.result = self.folder / "result.json"

    @property
    def label(self):
        return f"{self.spec} g{self.guidance:g}"


# ----------------------------------------------------------------------------------------------------------
# Modes and checks (no model work)


def parse_spec(spec):
    """A mode string with its steps -> make_mode's arguments (`ldm.models.diffusion.modes.mode_arguments`); a bad
    one is a UsageError naming it. The mode itself is built and checked as its sampling run builds it, calibrated
    steps resolved."""
    try:
        arguments = mode_arguments(spec)
    except (ValueError, TypeError) as e:
        raise cli.UsageError(cli.first_line(e)) from None
    if arguments["steps"] is None:
        raise cli.UsageError(f"mode {spec!r}: expected SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...]@S, e.g. "
                             "ddim+fd:uniform:4@50")
    return arguments


def sample_args(argv, spec):
    """image_sample.py's arguments; a bad value is a UsageError naming the mode (not argparse's exit)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return sampling_run.parse_args(argv)
    except SystemExit:
        raise cli.UsageError(f"mode {spec!r}: {err.getvalue().strip().removeprefix('error: ')}") from None


def slug(spec):
    """A folder name for a mode: its spec with path-unsafe characters replaced, and a digest of the spec."""
    return f"{re.sub(r'[^A-Za-z0-9.+=-]', '_', spec)[:60]}_{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def check_batch(path, flag, shape):
    """An ADM batch of images of the model's size."""
    try:
        evaluator.check_batch_file(path)
        with evaluator.NpzArrayReader(path, "arr_0") as reader:
            found = tuple(reader.shape[1:])
    except evaluator.InputError as e:
        raise cli.UsageError(f"{flag} {e}") from None
    if found != tuple(shape):
        raise cli.UsageError(f"{flag} {path} holds {found[0]}x{found[1]} images; the model makes "
                             f"{shape[0]}x{shape[1]}")


def base_spec(args, modes):
    """The mode that fidelity is measured against: --base, which must be one of the modes, or by default the most
    expensive plain one (the most UNet calls an image)."""
    if args.base is not None:
        if args.base not in modes:
            raise cli.UsageError(f"--base {args.base} is not one of the modes ({', '.join(modes)})")
        return args.base
    plain = {spec: sum(make_mode(**arguments).unet_calls(arguments["steps"], 1).values())
             for spec, arguments in modes.items() if arguments["cache"] == "none"}
    return max(plain, key=plain.get) if plain else None


def check_graph(args, classes):
    """The feature graph has the evaluator's tensors; returns whether to report classifier accuracy."""
    try:
        network = evaluator.InceptionNetwork(args.inception_path, threads=args.tf_threads)
    except evaluator.InputError as e:
        raise cli.UsageError(f"--inception_path {e}") from None
    outputs = int(network.softmax.shape[-1])
    network.close()
    if args.classifier_accuracy and outputs != classes:
        raise cli.UsageError(f"--classifier_accuracy: the graph has {outputs} logits, the model {classes} classes")
    return outputs == classes


def check(args):
    """Every check before any model work; returns (jobs, whether to report accuracy)."""
    specs = args.modes or SETS[args.set]
    try:
        evaluator.check_tf_threads(args.tf_threads)
        args.inception_path = args.inception_path or evaluator.fetch_inception_graph()
    except evaluator.InputError as e:
        raise cli.UsageError(str(e)) from None
    if not os.path.isfile(args.inception_path):
        raise cli.UsageError(f"--inception_path {args.inception_path}: no such file (the feature graph)")
    cli.check_writable_folder(args.out, "--out")
    jobs, model = [], None
    for spec in dict.fromkeys(specs):
        mode = parse_spec(spec)
        for guidance in args.guidance:
            folder = Path(args.out) / "samples" / f"n{args.num_samples}_seed{args.seed}" / f"{slug(spec)}_g{guidance:g}"
            argv = ["--config", args.config, "--ckpt", args.ckpt, "--num_samples", str(args.num_samples),
                    "--batch_size", str(args.batch_size), "--seed", str(args.seed), "--scale", str(guidance),
                    "--output_dir", str(folder), "--resume", "--tqdm_disable", "--mode", spec,
                    *(["--precision", args.precision] if mode["precision"] is None else []),
                    *(["--device", args.device] if args.device else [])]
            job = Job(spec, guidance, sample_args(argv, spec), mode["cache"])
            try:
                cli.apply_mode_flag(job.args)
                if model is None:  # the model's structure, built once for all modes
                    cli.check_files(job.args)
                    model = cli.inspect_model(job.args)
                sampling_run.check_run(job.args, model)  # the mode, its steps, calibration files, the folder
            except cli.UsageError as e:
                raise cli.UsageError(f"mode {spec!r}: {e}") from None
            jobs.append(job)
    args.base = base_spec(args, {spec: parse_spec(spec) for spec in dict.fromkeys(specs)})
    for path, flag in ((args.ref, "--ref"), (args.real, "--real")):
        if path:
            check_batch(path, flag, image_shape(model))
    return jobs, check_graph(args, num_classes(model))


# ----------------------------------------------------------------------------------------------------------
# Sampling, counting, scoring


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def warm_up(model, args):
    """One untimed sampling call of a batch, so that one-time start-up costs do not count in the first mode's time."""
    labels = sample_labels(args.seed, range(args.batch_size), num_classes(model))
    sample_latents(model, labels, 2, args.scale, precision=args.precision,
                   generators=sample_generators(args.seed, range(args.batch_size)))


def count(model, mode, args):
    """UNet FLOPs and passes of an image of the mode at --batch_size images, counted on one (the passes do not depend
    on the batch; FasterDiffusion's decoder calls hold as many steps as at --batch_size, see Mode.for_counting).
    A cache that decides per sample is counted on COUNT_IMAGES images, one at a time, and averaged."""
    mode = mode.for_counting(args.batch_size, args.scale != 1)
    first = count_image(model, mode, args, 0)
    if "full_steps_per_img" not in first:
        return first
    counts = [first] + [count_image(model, mode, args, i) for i in range(1, COUNT_IMAGES)]
    return {key: sum(c[key] for c in counts) / len(counts) for key in first}


def count_image(model, mode, args, index):
    """UNet FLOPs and passes of sample `index` alone; with a per-sample cache, the steps it ran whole and shallow."""
    labels = sample_labels(args.seed, [index], num_classes(model))
    _, intermediates = sample_latents(model, labels, args.steps, args.scale, mode=mode, precision=args.precision,
                                      generators=sample_generators(args.seed, [index]), count_flops=True)
    s = intermediates["stats"]
    counts = {"gflops_per_img": s.flops / 1e9, "encoder_passes": s.encoder_passes, "full_passes": s.full_passes,
              "shallow_passes": s.shallow_passes, "decoder_rows_per_img": s.decoder_rows}
    if s.sample_full_steps:
        counts.update(full_steps_per_img=s.sample_full_steps[0], shallow_steps_per_img=s.sample_shallow_steps[0])
    return counts


RERUN = "rerun the same frontier.py command"  # what continues an interrupted mode: frontier.py has no --resume


class Models:
    """This process's models, each loaded once for the flags that `cli.load` reads (a mode's precision among them):
    the modes of a frontier share them."""

    def __init__(self):
        self.loaded = {}

    def load(self, args, device):
        key = (str(device), *(getattr(args, flag) for flag in cli.LOAD_FLAGS))
        if key not in self.loaded:
            self.loaded[key] = cli.load(args, device)
        return self.loaded[key]

    def fp32(self, job_args, rank=0):
        """The model with float32 weights on this process's device: each mode's precision then makes its own."""
        fp32_args = argparse.Namespace(**{**vars(job_args), "precision": "fp32"})
        return self.load(fp32_args, cli.check_device(job_args, rank))


def sample_job(job, comm, counter, models):
    """Sample the job's missing images (all ranks) and, on rank 0, record its time, FLOPs and passes.
    Returns the exit status."""
    status, outcome = sampling_run.sample(job.args, comm, rerun=RERUN, load=models.load)
    if comm.bcast(status == 0 and comm.rank == 0 and outcome.images == 0):  # made, but not timed: sample again
        job.args.overwrite = True
        status, outcome = sampling_run.sample(job.args, comm, rerun=RERUN, load=models.load)
        job.args.overwrite = False
    if status == 0 and comm.rank == 0:
        write_json(job.result, {"spec": job.spec, "guidance": job.guidance, "cache": job.cache, "S": job.args.steps,
                                "samples": str(outcome.files.samples), "timed_images": outcome.images,
                                "s_per_img": outcome.sample_seconds / outcome.images,
                                **counter(outcome.mode, job.args)})
    return status


def job_mode(job):
    """The job's mode as its run sampled it: 'auto:K' steps as calibrated then (recorded beside its samples)."""
    mode = cli.make_mode(argparse.Namespace(**vars(job.args)))
    if mode.plan.calibrating():
        mode = mode.with_steps(read_json(Path(read_json(job.result)["samples"]).with_suffix(".json"))["calibrated_steps"])
    return mode


def timing_key(args, jobs):
    """What the timing rounds depend on: the modes and guidances in their order, their precisions and the settings."""
    return {"jobs": [job.label for job in jobs], "precisions": [job.args.precision for job in jobs],
            "repeats": args.repeats, "timing_batch": args.timing_batch, "seed": args.seed, "device": args.device,
            "checkpoint_sha256": file_sha256(args.ckpt), "config_sha256": file_sha256(args.config)}


def timed_call(model, mode, job_args, batch):
    """What a round times of the mode: one sampling call of the first `batch` samples; first, untimed, each kind of UNet
    call it makes, once."""
    a = job_args
    run_mode_calls(model, [mode], a.steps, batch, a.scale != 1, a.precision)
    labels = sample_labels(a.seed, range(batch), num_classes(model))
    return lambda: sample_latents(model, labels, a.steps, a.scale, mode=mode, precision=a.precision,
                                  generators=sample_generators(a.seed, range(batch)))


def time_jobs(args, jobs, models):
    """Seconds of a sampling call of --timing_batch images in each job's mode, over --repeats rounds that take the
    modes in turn (rank 0); those of <out>/timing.json when it was made for these jobs and settings. Modes are ranked
    against the others at their guidance, as the speed-ups and Pareto fronts compare them."""
    path = Path(args.out) / "timing.json"
    key = timing_key(args, jobs)
    guidance = {job.label: job.guidance for job in jobs}  # modes rank against the others at their guidance
    saved = read_json(path)
    if saved and saved.get("key") == key:
        return Timings(saved["seconds"], groups=guidance)
    device = cli.check_device(jobs[0].args)
    runs = {}
    for job in jobs:  # the model with its weights stored as the sampling run stored them
        runs[job.label] = timed_call(models.load(job.args, device), job_mode(job), job.args, args.timing_batch)
    print(f"timing {len(jobs)} modes in turn: {args.repeats} rounds of a call of {args.timing_batch} images each",
          flush=True)
    timings, _ = alternate(runs, args.repeats, device_clock(device))
    write_json(path, {"key": key, "seconds": timings.seconds})
    return Timings(timings.seconds, groups=guidance)


class Scorer:
    """The evaluator's network and the reference's activations, and those of its first-stage reconstructions, made
    once (rank 0)."""

    def __init__(self, args, accuracy, reconstructed_ref):
        self.args, self.accuracy, self.reconstructed_ref = args, accuracy, reconstructed_ref
        self.network = self.ref = self.reconstructed = None
        self.against = {"ref_sha256": file_sha256(args.ref), "graph_sha256": file_sha256(args.inception_path),
                        "checkpoint_sha256": file_sha256(args.ckpt), "config_sha256": file_sha256(args.config)}

    def activations(self, path):
        """(pool, spatial) activations and statistics of an .npz."""
        acts = self.network.read_activations(path)
        return acts, evaluator.read_statistics(path, acts)

    def __call__(self, path):
        """Metrics of an .npz, its FID against the reconstructed reference (fid_recon), and the accuracy of its labels
        when the graph classifies the model's classes."""
        if self.network is None:
            self.network = evaluator.InceptionNetwork(self.args.inception_path, threads=self.args.tf_threads)
            self.ref = self.activations(self.args.ref)
            self.reconstructed = self.activations(self.reconstructed_ref())[1]
            evaluator.warn_if_too_few_images([path], self.network.feature_dims)  # every mode has as many images
        acts, stats = self.activations(path)
        metrics = evaluator.score(self.network, *self.ref, acts, stats, log=lambda *a: None)
        metrics["fid_recon"] = stats[0].frechet_distance(self.reconstructed[0])
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.accuracy:
            with np.load(path) as npz:
                labels = npz["arr_1"] if "arr_1" in npz.files else None
            predicted = self.network.compute_softmax(acts[0]).argmax(axis=1)
            metrics["accuracy"] = None if labels is None else float((predicted == labels).mean())
        return {**metrics, **self.against}

    def fidelity(self, base_path, path):
        """Per-pair fidelity of an .npz to the base mode's (evaluations/fidelity.py): means and 95% intervals."""
        if self.network is None:
            self.network = evaluator.InceptionNetwork(self.args.inception_path, threads=self.args.tf_threads)
        base = fidelity.read_batch(base_path)
        measures = fidelity.measure(self.network, base, {"samples": path}, FIDELITY_BATCH)
        return fidelity.summarize(measures, FIDELITY_RESAMPLES, self.args.seed)["samples_vs_base"]

    def close(self):
        if self.network is not None:
            self.network.close()


def real_result(args):
    return Path(args.out) / "real" / f"n{args.num_samples}" / "result.json"


def first_images(args):
    """--real cut to its first N images (written beside the real row's result when it holds more)."""
    with evaluator.NpzArrayReader(args.real, "arr_0") as reader:  # streamed: a large batch is not read whole
        if len(reader) <= args.num_samples:
            return args.real
        arrays = {"arr_0": next(reader.read_batches(args.num_samples))}
    with np.load(args.real) as npz:
        if "arr_1" in npz.files:
            arrays["arr_1"] = npz["arr_1"][:args.num_samples]
    path = real_result(args).with_name("real.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **arrays))
    return str(path)


def reconstructed_result(args):
    return Path(args.out) / "reconstructed" / f"n{args.num_samples}" / "result.json"


def write_reconstructions(model, images_path, path, batch_size):
    """The images of an .npz through the model's first stage, as an ADM .npz (labels kept; precomputed statistics of
    the originals left out)."""
    with np.load(images_path) as npz:
        arrays = {k: npz[k] for k in ("arr_0", "arr_1") if k in npz.files}
    images = torch.from_numpy(arrays["arr_0"])
    arrays["arr_0"] = torch.cat([reconstruct(model, images[i:i + batch_size])
                                 for i in range(0, len(images), batch_size)]).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **arrays))
    return str(path)


def scored(result, scorer, against=None):
    """Whether a result holds metrics made with the scorer's reference, graph and model, and from the inputs whose
    hashes `against` gives."""
    return result is not None and "fid_recon" in result and \
        all(result.get(k) == v for k, v in {**scorer.against, **(against or {})}.items())


def reconstructed_reference(args, get_model):
    """The path of --ref's images through the model's first stage (made once, kept in <out>/reference/)."""
    path = Path(args.out) / "reference" / "reconstructed.npz"
    record = path.with_suffix(".json")
    made_from = {"ref_sha256": file_sha256(args.ref), "checkpoint_sha256": file_sha256(args.ckpt),
                 "config_sha256": file_sha256(args.config)}
    if not path.is_file() or read_json(record) != made_from:
        print(f"reconstructing the reference images through the first stage into {path}", flush=True)
        write_reconstructions(get_model(), args.ref, path, args.batch_size)
        write_json(record, made_from)
    return str(path)


def samples_checksum(path):
    """The checksum of a sampling run's .npz, from its record."""
    return (read_json(Path(path).with_suffix(".json")) or {}).get("samples_sha256")


def fidelity_to_base(jobs, scorer, base):
    """Each job's fidelity to the base mode at its guidance, unless measured against that base's samples (rank 0)."""
    bases = {job.guidance: job for job in jobs if job.spec == base}
    for job in jobs:
        result, base_job = read_json(job.result), bases[job.guidance]
        base_samples = read_json(base_job.result)["samples"]
        made_from = {"base": base, "base_samples_sha256": samples_checksum(base_samples),
                     "samples_sha256": samples_checksum(result["samples"])}
        measured = result.get("fidelity") or {}
        if {k: measured.get(k) for k in made_from} != made_from:
            print(f"{job.label}: fidelity to {base}", flush=True)
            write_json(job.result, {**result, "fidelity": {**made_from,
                                                           **scorer.fidelity(base_samples, result["samples"])}})


# ----------------------------------------------------------------------------------------------------------
# Table, JSON, plot


def quality_of(row, quality):
    """(value, the same signed so that lower is better) of a row's quality measure; (None, None) where it has none."""
    _, higher_is_better, value = QUALITIES[quality]
    v = value(row)
    return (None, None) if v is None else (v, -v if higher_is_better else v)


def pareto(rows, key, quality="fid"):
    """Whether each row is on its guidance's front of (key, quality): no other row at the same guidance is at least as
    good in both and better in one. Rows without the measure (the base mode, for fidelity) are on no front."""
    signed = [quality_of(r, quality)[1] for r in rows]
    return [q is not None and not any(
        o["guidance"] == r["guidance"] and p is not None and o[key] <= r[key] and p <= q and (o[key], p) != (r[key], q)
        for o, p in zip(rows, signed)) for r, q in zip(rows, signed)]


def speedups(rows):
    """s/img of the DDIM row with the most steps at the same guidance, divided by the row's."""
    out = []
    for r in rows:
        ddim = [o for o in rows if o["guidance"] == r["guidance"] and re.fullmatch(r"ddim@\d+", o["spec"])]
        base = max(ddim, key=lambda o: o["S"])["s_per_img"] if ddim else None
        out.append(None if base is None else base / r["s_per_img"])
    return out


def fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}g}"


def answer(rows, quality="fid"):
    """Per guidance: the fastest mode at least as good as 100-step DDIM in the quality measure, and by how much."""
    lines = []
    name = QUALITIES[quality][0]
    for g in dict.fromkeys(r["guidance"] for r in rows):
        base = next((r for r in rows if r["guidance"] == g and r["spec"] == "ddim@100"), None)
        if base is None or quality_of(base, quality)[0] is None:
            continue
        value, signed = quality_of(base, quality)
        good = [r for r in rows if r["guidance"] == g and quality_of(r, quality)[1] is not None
                and quality_of(r, quality)[1] <= signed]
        best = min(good, key=lambda r: r["s_per_img"])
        lines.append(f"At guidance {g:g}, 100-step DDIM has {name} {value:.4g} at {base['s_per_img']:.4g} s/img; "
                     f"the fastest mode at least as good is `{best['spec']}` ({quality_of(best, quality)[0]:.4g}, "
                     f"{best['s_per_img']:.4g} s/img), {base['s_per_img'] / best['s_per_img']:.2f}x faster.")
    return lines


def equal_k(rows):
    """Markdown rows comparing FasterDiffusion uniform:N and auto:K key steps at the same encoder passes."""
    fd = [r for r in rows if r["cache"] == "fd" and re.search(r":(uniform|auto):\d+", r["spec"])]
    lines = []
    for r in fd:
        if ":uniform:" not in r["spec"]:
            continue
        twin = next((o for o in fd if ":auto:" in o["spec"] and o["guidance"] == r["guidance"] and o["S"] == r["S"]
                     and o["encoder_passes"] == r["encoder_passes"]
                     and o["spec"].split("+")[0] == r["spec"].split("+")[0]), None)
        if twin:
            lines.append(f"| {r['guidance']:g} | {r['S']} | {r['encoder_passes']} | `{r['spec']}` | {r['fid']:.4g} | "
                         f"`{twin['spec']}` | {twin['fid']:.4g} |")
    if not lines:
        return []
    return ["", "FasterDiffusion key steps at equal encoder passes (K): uniform against calibrated (`auto:K`).", "",
            "| guidance | S | K | uniform | FID | calibrated | FID |", "|---|---|---|---|---|---|---|", *lines]


def interval_text(measure, digits=4):
    """'mean (low-high)' of a fidelity measure."""
    low, high = measure["interval"]
    return f"{measure['mean']:.{digits}g} ({low:.{digits}g}-{high:.{digits}g})"


def fidelity_cells(row):
    """PSNR, SSIM and feature distance to the base mode, each with its 95% interval ('base' on the base's row)."""
    measured = row.get("fidelity")
    if not measured:
        return ["-"] * 3
    if measured["base"] == row["spec"]:
        return ["base"] * 3
    return [interval_text(measured[k], digits) for k, digits in (("psnr", 4), ("ssim", 3), ("feature_distance", 3))]


def markdown(rows, real, settings, reconstructed=None, timing=None):
    speed = speedups(rows)
    quality = settings.get("quality", "fid")
    head = ["guidance", "mode", "S", "s/img", "speed-up", "GFLOP/img", "encoder passes", "FID", "FID vs recon.",
            "sFID", "IS", "precision", "recall", "accuracy", "PSNR (dB)", "SSIM", "feature distance", "Pareto front"]
    base = settings.get("base")
    lines = [f"# Speed-quality frontier of {settings['config']}", "",
             f"{settings['num_samples']} samples a mode (seed {settings['seed']}) against {settings['ref']}, features "
             f"of {settings['inception_path']}. Modes compute in {settings.get('precision', 'fp32')} unless they "
             "say `precision=...`. s/img: sampling seconds per image of one process, decoding excluded; "
             "speed-up against the DDIM row with the most steps at the same guidance. FID vs recon.: against the "
             "reference images' first-stage reconstructions, what the samplers can reach. " +
             ("" if base is None else f"PSNR, SSIM and feature distance (relative L2 of the feature graph's pool "
                                      f"features): to `{base}` at the same guidance from the same seeds, mean and 95% "
                                      "bootstrap interval over the pairs. ") +
             f"Pareto front: no mode at the same guidance is both faster (or cheaper in FLOPs) and better in "
             f"{QUALITIES[quality][0]}." + ("" if timing is None else f" Times: {timing_note(settings, timing)}."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, floor in (("real (held-out)", real), ("first stage (held-out, reconstructed)", reconstructed)):
        if floor:
            lines.append(f"| - | {name} | - | - | - | - | - | " + " | ".join(
                fmt(floor.get(k)) for k in ("fid", "fid_recon", "sfid", "inception_score", "precision", "recall",
                                            "accuracy")) + " | - | - | - | - |")
    for r, s in zip(rows, speed):
        front = " and ".join(name for name, on in (("time", r["front_time"]), ("FLOPs", r["front_flops"])) if on)
        lines.append(f"| {r['guidance']:g} | `{r['spec']}` | {r['S']} | {r['s_per_img']:.4g} | "
                     f"{'-' if s is None else f'{s:.2f}x'} | {r['gflops_per_img']:.4g} | {r['encoder_passes']:g} | " +
                     " | ".join(fmt(r.get(k)) for k in ("fid", "fid_recon", "sfid", "inception_score", "precision",
                                                         "recall", "accuracy")) +
                     " | " + " | ".join(fidelity_cells(r)) + f" | {front or '-'} |")
    extra = [line for q in dict.fromkeys((quality, "fid", "fid_recon", "psnr", "feature")) for line in answer(rows, q)]
    return "\n".join(lines + ([""] + extra if extra else []) + equal_k(rows)) + "\n"


def timing_note(settings, timing):
    """How the s/img were timed, and whether their rounds rank the modes (frontier.json's "timing")."""
    return (f"median of {timing['repeats']} rounds that took the modes in turn, a sampling call of "
            f"{settings['timing_batch']} images each; {timing['verdict']}")


def _minor_tick(value, _):
    """Log-axis minor ticks labelled at 2x and 5x a power of ten only, so that they do not crowd."""
    return f"{value:g}" if round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""


def _set_scale(ax, axis, values):
    """A log axis with labelled 2x and 5x minor ticks where the values span a decade or more; otherwise matplotlib's
    linear axis, whose ticks stay readable over a narrow range (a log axis there may label a single tick)."""
    if min(values) <= 0 or max(values) < 10 * min(values):
        return
    getattr(ax, f"set_{axis}scale")("log")
    ticks = ax.xaxis if axis == "x" else ax.yaxis
    ticks.set_major_formatter(FormatStrFormatter("%g"))
    ticks.set_minor_formatter(FuncFormatter(_minor_tick))


def label_groups(pixels, radius):
    """Indices of points grouped by chains of neighbours within `radius` (pixels, each axis), in order of their
    first point: one label per group keeps the numbers of clustered points from printing over each other."""
    group_of = list(range(len(pixels)))

    def root(i):
        while group_of[i] != i:
            i = group_of[i]
        return i

    for i, (x, y) in enumerate(pixels):
        for j in range(i):
            if abs(pixels[j][0] - x) <= radius and abs(pixels[j][1] - y) <= radius:
                group_of[root(i)] = root(j)
    groups = {}
    for i in range(len(pixels)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def _number_points(ax, points, radius=12, per_line=8):
    """Label the points with their 1-based numbers, one label per cluster, at the cluster's highest point; returns
    the labels."""
    ax.autoscale_view()
    pixels = ax.transData.transform(points).tolist()
    labels = []
    for group in label_groups(pixels, radius):
        numbers = [str(i + 1) for i in group]
        text = "\n".join(", ".join(numbers[k:k + per_line]) for k in range(0, len(numbers), per_line))
        top = max(group, key=lambda i: pixels[i][1])
        labels.append(ax.annotate(text, points[top], fontsize=7, xytext=(3, 3), textcoords="offset points",
                                  va="bottom"))
    return labels


def _lift_overlapping(fig, labels, gap=1.0):
    """Move labels up, lowest first, until none overlaps one placed before it."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for label in sorted(labels, key=lambda a: a.get_window_extent(renderer).y0):
        box = label.get_window_extent(renderer)
        for other in sorted(placed, key=lambda b: b.y0):
            if box.overlaps(other):
                lift = other.y1 + gap - box.y0
                x, y = label.xyann
                label.xyann = (x, y + lift * 72 / fig.dpi)
                box = label.get_window_extent(renderer)
        placed.append(box)


def plot(rows, real, path, key_columns=3, reconstructed=None, quality="fid"):
    """The quality measure (--quality) against s/img and against GFLOP/img, one colour per guidance, each guidance's
    Pareto front dashed in its colour, one marker per cache, hollow in half precision; points are numbered in table
    order and named in a key below, so that clustered modes stay readable. Rows without the measure (the base mode,
    for fidelity) are left out."""
    measure, higher_is_better, _ = QUALITIES[quality]
    rows = [r for r in rows if quality_of(r, quality)[0] is not None]
    y = [quality_of(r, quality)[0] for r in rows]
    colours = dict(zip(dict.fromkeys(r["guidance"] for r in rows), plt.cm.tab10.colors))
    dtypes = set(r.get("dtype", "fp32") for r in rows)
    markers = dict(zip(dict.fromkeys(r["cache"] for r in rows), "os^Dvp*hX<>"))
    names = [r["spec"] + (f" g{r['guidance']:g}" if len(colours) > 1 else "") for r in rows]
    floors = [(floor[quality], style, label) for floor, style, label in
              ((real, ":", "real held-out images"), (reconstructed, "-.", "their first-stage reconstructions"))
              if quality in ("fid", "fid_recon") and floor and floor.get(quality) is not None]
    key_lines = -(-len(rows) // key_columns)
    fig = plt.figure(figsize=(15, 6.5 + 0.16 * key_lines), dpi=110)
    grid = fig.add_gridspec(2, 2, height_ratios=(6.5, 0.16 * key_lines + 0.1))
    labels_per_axis = []
    for column, (key, front, xlabel) in enumerate((("s_per_img", "front_time", "seconds per image (sampling)"),
                                                   ("gflops_per_img", "front_flops", "UNet GFLOPs per image"))):
        ax = fig.add_subplot(grid[0, column])
        for r, v in zip(rows, y):
            colour = colours[r["guidance"]]
            ax.scatter(r[key], v, marker=markers[r["cache"]], s=28, zorder=3, edgecolors=colour,
                       facecolors=colour if r.get("dtype", "fp32") == "fp32" else "white")
        for g, c in colours.items():
            on = sorted((r[key], v) for r, v in zip(rows, y) if r[front] and r["guidance"] == g)
            ax.step([x for x, _ in on], [v for _, v in on], where="post", color=c, ls="--", lw=1, zorder=2)
        ax.plot([], [], color="black", ls="--", lw=1, label="Pareto front (per guidance)")
        for value, style, label in floors:
            ax.axhline(value, color="grey", ls=style, lw=1, label=f"{label} ({value:.3g})")
        for g, c in colours.items():
            ax.scatter([], [], color=c, label=f"guidance {g:g}")
        for cache in markers:
            ax.scatter([], [], color="grey", marker=markers[cache], label=f"cache {cache}")
        if len(dtypes) > 1:
            half = ", ".join(sorted(dtypes - {"fp32"}))
            ax.scatter([], [], marker="o", color="grey", label="fp32 (filled)")
            ax.scatter([], [], marker="o", edgecolors="grey", facecolors="white", label=f"{half} (hollow)")
        _set_scale(ax, "x", [r[key] for r in rows])
        _set_scale(ax, "y", y + [value for value, _, _ in floors])
        ax.tick_params(which="both", labelsize=7)
        ax.margins(x=0.08, y=0.08)
        labels_per_axis.append(_number_points(ax, [(r[key], v) for r, v in zip(rows, y)]))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{measure} ({'higher' if higher_is_better else 'lower'} is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    key = fig.add_subplot(grid[1, :])
    key.axis("off")
    for number, name in enumerate(names, 1):
        column, line = divmod(number - 1, key_lines)
        key.text(column / key_columns, 1 - line / key_lines, f"{number:>2}  {name}", fontsize=7, va="top",
                 family="monospace", transform=key.transAxes)
    fig.suptitle(f"Speed-quality frontier: {measure} against time and against FLOPs")
    fig.tight_layout()
    for ax_labels in labels_per_axis:
        _lift_overlapping(fig, ax_labels)
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def write_outputs(args, jobs, accuracy, timings):
    """frontier.json, frontier.md and frontier.png from the jobs' results and their timing rounds (rank 0)."""
    rows = []
    for job in jobs:
        result = read_json(job.result)
        rows.append({**result, "dtype": job.args.precision, "run_s_per_img": result["s_per_img"],
                     "s_per_img": timings.median(job.label) / args.timing_batch,
                     "s_per_img_rounds": [t / args.timing_batch for t in timings.seconds[job.label]],
                     "s_per_img_spread": timings.spread(job.label)})
    for key, front in (("s_per_img", "front_time"), ("gflops_per_img", "front_flops")):
        for r, on in zip(rows, pareto(rows, key, args.quality)):
            r[front] = on
    real = read_json(real_result(args)) if args.real else None
    reconstructed = read_json(reconstructed_result(args)) if args.real else None
    settings = {k: getattr(args, k) for k in ("config", "ckpt", "ref", "inception_path", "real", "num_samples", "seed",
                                              "guidance", "precision", "repeats", "timing_batch", "base", "quality")}
    settings["checkpoint_sha256"] = file_sha256(args.ckpt)
    out = Path(args.out)
    timing = {k: v for k, v in timings.record().items() if k != "runs"}  # the rounds are in the rows
    write_json(out / "frontier.json", {"settings": settings, "classifier_accuracy": accuracy, "timing": timing,
                                       "real": real, "reconstructed": reconstructed, "rows": rows})
    write_atomic(out / "frontier.md",
                 lambda f: f.write(markdown(rows, real, settings, reconstructed, timing).encode()))
    plot(rows, real, out / "frontier.png", reconstructed=reconstructed, quality=args.quality)
    print(f"times: {timing_note(settings, timing)}", flush=True)
    print(f"wrote {out / 'frontier.md'}, {out / 'frontier.json'}, {out / 'frontier.png'}", flush=True)


# ----------------------------------------------------------------------------------------------------------


def score_floors(args, scorer, get_model):
    """The rows of --real's first N images and of their first-stage reconstructions, unless already scored
    (rank 0)."""
    real = None
    against = {"real_sha256": file_sha256(args.real)}
    if not scored(read_json(real_result(args)), scorer, against):
        real = first_images(args)
        write_json(real_result(args), {"samples": args.real, "images": args.num_samples, **against, **scorer(real)})
    against.update(checkpoint_sha256=file_sha256(args.ckpt), config_sha256=file_sha256(args.config))
    path = reconstructed_result(args)
    if not scored(read_json(path), scorer, against):
        real = real or first_images(args)
        images = write_reconstructions(get_model(), real, path.with_name("reconstructed.npz"), args.batch_size)
        write_json(path, {"samples": images, "images": args.num_samples, **against, **scorer(images)})


def main(args, comm):
    """Check everything, then sample, count and score each unfinished mode; returns the exit status."""
    jobs, accuracy = sampling_run.collective(comm, lambda: check(args))
    models, model, scorer = Models(), None, None

    def rank0_model():
        return models.fp32(jobs[0].args)

    try:
        if comm.rank == 0:
            scorer = Scorer(args, accuracy, lambda: reconstructed_reference(args, rank0_model))
        for job in jobs:
            if not comm.bcast(comm.rank == 0 and "s_per_img" in (read_json(job.result) or {})):
                if model is None:  # on every process: warm-up; on rank 0 also FLOP counting
                    model = models.fp32(job.args, comm.rank)
                    warm_up(model, job.args)
                status = sample_job(job, comm, lambda mode, a: count(model, mode, a), models)
                if status:
                    return status
            if comm.rank == 0:
                result = read_json(job.result)
                if not scored(result, scorer):
                    write_json(job.result, {**result, **scorer(result["samples"])})
                    result = read_json(job.result)
                print(f"{job.label}: {result['s_per_img']:.4g} s/img in its sampling run, "
                      f"{result['gflops_per_img']:.4g} GFLOP/img, FID {result['fid']:.4g}", flush=True)
            comm.wait_all()
        if comm.rank == 0:
            if args.base is not None:
                fidelity_to_base(jobs, scorer, args.base)
            if args.real:
                score_floors(args, scorer, rank0_model)
            timings = time_jobs(args, jobs, models)
            write_outputs(args, jobs, accuracy, timings)
    except KeyboardInterrupt as interrupt:
        if comm.rank == 0:
            print("stopped: finished modes are kept; rerun the same command to continue", file=sys.stderr, flush=True)
        return cli.interrupt_exit_status(interrupt)
    finally:
        if scorer is not None:
            scorer.close()
    return 0


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    group = parser.add_argument_group("frontier")
    group.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                       help="modes SOLVER[+CACHE[:VALUE]][,OPTION=VALUE...]@S (instead of --set)")
    group.add_argument("--set", choices=list(SETS), default="default", help="a named list of modes")
    group.add_argument("--quick", action="store_true",
                       help=f"--set quick with {QUICK_SAMPLES} samples a mode (unless --num_samples)")
    group.add_argument("--guidance", type=float, nargs="+", default=[1.5], help="guidance scales; each mode runs at each")
    group.add_argument("--num_samples", type=int, default=None, help=f"samples a mode (default {DEFAULT_SAMPLES})")
    group.add_argument("--seed", type=int, default=0, help="seed of every mode's labels and noise")
    group.add_argument("--batch_size", type=int, default=250, help="samples per batch (per process)")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: each process's GPU, else cpu)")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="of every mode (a mode's precision=... overrides it)")
    group.add_argument("--repeats", type=int, default=3,
                       help="timing rounds, each a sampling call of every mode in turn; s/img is their median")
    group.add_argument("--timing_batch", type=int, default=None,
                       help=f"images of a timed call (default {TIMING_BATCH}, at most --batch_size)")
    group.add_argument("--out", default=None, help="output folder (default outputs/frontier/<config name>)")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--ref", required=True, help="reference batch .npz (ADM format)")
    scoring.add_argument("--inception_path", default=None,
                         help="feature graph (.pb) for evaluations/evaluator.py (default: the Inception graph, "
                              "fetched once as the evaluator does)")
    scoring.add_argument("--real", default=None,
                         help="held-out real images .npz: rows for them (the floor) and for their first-stage "
                              "reconstructions")
    scoring.add_argument("--base", default=None, metavar="MODE",
                         help="the mode (of --modes or --set, at each guidance) that fidelity (PSNR, SSIM, feature "
                              "distance, evaluations/fidelity.py) is measured against; default: the most expensive "
                              "plain mode")
    scoring.add_argument("--quality", choices=list(QUALITIES), default="fid",
                         help="the plot's y axis and the Pareto fronts' measure (default fid)")
    scoring.add_argument("--classifier_accuracy", action="store_true",
                         help="report the share of samples the graph classifies as their label (automatic when the "
                              "graph's logits are exactly the model's classes)")
    scoring.add_argument("--tf_threads", type=int, default=None, help="TensorFlow threads of the evaluator")
    args = parser.parse_args(argv)
    if args.modes is not None and ("set" in args.given or args.quick):
        parser.error("--modes replaces --set and --quick: give one of them")
    if args.quick:
        args.set = "quick"
    if args.num_samples is None:
        args.num_samples = QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES
    if args.num_samples < evaluator.NHOOD_SIZE + 1:
        parser.error(f"--num_samples must be at least {evaluator.NHOOD_SIZE + 1} (precision and recall compare each "
                     f"sample with its {evaluator.NHOOD_SIZE} nearest neighbours), not {args.num_samples}")
    for flag, value in (("--repeats", args.repeats), ("--timing_batch", args.timing_batch)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, not {value}")
    if args.timing_batch is None:
        args.timing_batch = min(TIMING_BATCH, max(args.batch_size, 1))
    args.out = args.out or f"outputs/frontier/{model_name(args.config)}"
    return args


def run(argv=None):
    """main() with SIGTERM handled like Ctrl-C and, under MPI, one rank's crash ending all ranks."""
    args = parse_args(argv)
    comm = Comm()
    share_cpu_threads(comm)
    with cli.sigterm_as_interrupt(), torch.no_grad():
        try:
            return main(args, comm)
        except Exception:
            if comm.size > 1:
                traceback.print_exc()
                comm.abort(1)
            raise


if __name__ == "__main__":
    sys.exit(run())
