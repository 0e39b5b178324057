"""Sample the class-conditional ImageNet LDM with DDIM (optionally FasterDiffusion) into an ADM-format .npz.

    python scripts/image_sample.py [flags]                  # one process
    mpiexec -n R python scripts/image_sample.py [flags]     # R processes (one GPU each)

Sample i gets its label and noise from (--seed, i) alone, so the output depends only on the seed and
--num_samples, not on --batch_size or the number of processes (up to float rounding). Batch k holds samples
[k*B, (k+1)*B); process r does the batches k = r, r+R, r+2R, ... and writes each finished batch as a shard
to <output_dir>/shards_{N}x{H}x{W}x3/. Process 0 then merges the shards, one at a time, into
<output_dir>/samples_{N}x{H}x{W}x3.npz (arr_0: uint8 NHWC images, arr_1: int64 labels, in sample order) and
removes them. An interrupted run continues from its shards with --resume; without --resume, existing shards
are an error. With several processes, output_dir must be on a file system that all of them see.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ldm.models.diffusion.ddim import make_ddim_timesteps
from ldm.models.diffusion.faster_diffusion import CONTEXT_LAYOUTS, FasterDiffusion
from ldm.sampling import decode_latents, sample_generators, sample_labels, sample_latents, to_uint8
from ldm.util import PRECISIONS, autocast, load_model, optimize_for_inference, write_atomic

SHARD_NAME = re.compile(r"batch_(\d+)\.npz")
STOPPED_EXIT_CODE = 3


class UsageError(Exception):
    """Bad input, reported as one `error: ...` line and a non-zero exit on every process."""


class Comm:
    """The MPI world, or a stand-in when there is one process or mpi4py is missing."""

    def __init__(self):
        try:
            from mpi4py import MPI
            world = MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None
        except (ImportError, RuntimeError):
            world = None
        self.world = world
        self.rank = world.Get_rank() if world else 0
        self.size = world.Get_size() if world else 1

    def bcast(self, obj):
        return self.world.bcast(obj, root=0) if self.world else obj

    def gather(self, obj):
        return self.world.gather(obj, root=0) if self.world else [obj]

    def allgather(self, obj):
        return self.world.allgather(obj) if self.world else [obj]

    def wait_all(self, poll=None, interval=0.2):
        """Barrier that sleeps instead of spinning (ranks may wait long); calls poll() while waiting."""
        if not self.world:
            return
        request = self.world.Ibarrier()
        while not request.Test():
            if poll:
                poll()
            time.sleep(interval)

    def local_size(self):
        """Number of processes on this node."""
        if not self.world:
            return 1
        from mpi4py import MPI
        return self.world.Split_type(MPI.COMM_TYPE_SHARED).Get_size()

    def abort(self, code):
        if self.world:
            self.world.Abort(code)
        sys.exit(code)


def exit_on_error(comm, errors):
    """All ranks call this together: on any error, rank 0 prints the first one and every rank exits 2."""
    errors = [e for e in errors if e]
    if errors:
        if comm.rank == 0:
            print(f"error: {errors[0]}", file=sys.stderr, flush=True)
        sys.exit(2)


def str2bool(value):
    """Booleans as the published flags spell them: yes/true/t/y/1 or no/false/f/n/0."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, not {value!r}")


def default_device(rank):
    if torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return "cpu"


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def image_shape(config_path):
    """(H, W, C) of the decoded images: latent size times the first stage's downsampling factor."""
    try:
        params = OmegaConf.load(config_path).model.params
        factor = 2 ** (len(params.first_stage_config.params.ddconfig.ch_mult) - 1)
        size = int(params.image_size) * factor
        channels = int(params.first_stage_config.params.ddconfig.out_ch)
    except Exception as e:
        raise UsageError(f"config {config_path} does not describe a latent diffusion model "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return [size, size, channels]


def make_plan(args):
    """FasterDiffusion plan for the flags, or None for plain DDIM."""
    if not args.use_faster_diffusion:
        return None
    return FasterDiffusion(args.key_steps, context_layout=args.context_layout,
                           max_decoder_batch=args.max_decoder_batch)


def check_inputs(args):
    """Cheap checks of every flag before any model is loaded; returns the settings that define the output."""
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, not {args.num_samples}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, not {args.batch_size}")
    if args.ddim_eta < 0:
        raise UsageError(f"--ddim_eta must not be negative, not {args.ddim_eta}")
    if not os.path.isfile(args.config_path):
        raise UsageError(f"config not found: {args.config_path}")
    if not os.path.isfile(args.model_path):
        raise UsageError(f"checkpoint not found: {args.model_path}")
    try:
        make_ddim_timesteps(args.ddim_steps)
    except ValueError as e:
        raise UsageError(f"--ddim_steps: {e}") from None
    try:
        plan = make_plan(args)
        key_steps = list(plan.key_steps_for(args.ddim_steps)) if plan else None
    except ValueError as e:
        raise UsageError(f"invalid --key_steps/--context_layout/--max_decoder_batch: {e}") from None
    try:
        device = torch.device(args.device or default_device(0))
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device name such as cpu or cuda:0") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UsageError(f"--device {args.device}: no such CUDA device here")
    try:
        autocast(args.precision, device)
    except ValueError as e:
        raise UsageError(f"--precision {args.precision}: {e}") from None
    model_stat = os.stat(args.model_path)
    return {
        "config_sha256": file_sha256(args.config_path),
        "model": {"path": os.path.realpath(args.model_path), "size": model_stat.st_size,
                  "mtime_ns": model_stat.st_mtime_ns},
        "image_shape": image_shape(args.config_path),
        "num_samples": args.num_samples,
        "seed": args.seed,
        "batch_size": args.batch_size,  # defines the shard boundaries, not the images
        "ddim_steps": args.ddim_steps,
        "ddim_eta": args.ddim_eta,
        "classifier_scale": args.classifier_scale,
        "precision": args.precision,
        "faster_diffusion": None if plan is None else {"key_steps": key_steps, "context_layout": args.context_layout,
                                                       "noise_injection": plan.noise_injection},
    }


def finished_batches(shard_dir):
    """Batch numbers whose shard exists."""
    if not shard_dir.is_dir():
        return set()
    return {int(m.group(1)) for m in map(SHARD_NAME.fullmatch, os.listdir(shard_dir)) if m}


def batch_range(k, batch_size, num_samples):
    return range(k * batch_size, min((k + 1) * batch_size, num_samples))


def output_paths(args, settings):
    """Check that output_dir is writable and that its shards fit --resume; returns (final .npz, shard dir)."""
    name = "x".join(map(str, [args.num_samples, *settings["image_shape"]]))
    out_dir = Path(args.output_dir)
    shard_dir = out_dir / f"shards_{name}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / ".write_test", lambda f: f.write(b"ok"))
        (out_dir / ".write_test").unlink()
    except OSError as e:
        raise UsageError(f"cannot write to output directory {out_dir}: {e.strerror or e}") from None
    done = finished_batches(shard_dir)
    settings_file = shard_dir / "settings.json"
    if done and not settings_file.is_file():
        raise UsageError(f"{shard_dir} holds shards but no settings.json; delete it to start over")
    if done and not args.resume:
        raise UsageError(f"{shard_dir} holds {len(done)} finished batches of an earlier run; "
                         "pass --resume to continue it, or delete that directory to start over")
    if args.resume and settings_file.is_file():
        old = json.loads(settings_file.read_text())
        changed = [f"{k} ({old.get(k)} vs {v})" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise UsageError(f"cannot --resume from {shard_dir}: its shards were made with different settings: "
                             f"{'; '.join(changed)}")
    return out_dir / f"samples_{name}.npz", shard_dir


def start_shards(shard_dir, settings):
    """Create the shard dir and record the settings its shards are made with."""
    shard_dir.mkdir(exist_ok=True)
    write_atomic(shard_dir / "settings.json", lambda f: f.write(json.dumps(settings, indent=1).encode()))


def clock(device):
    """Wall-clock time after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def sample_batch(model, indices, args, plan):
    """Sample indices -> (uint8 NHWC images, labels, sampling seconds, decoding seconds)."""
    device = model.device
    start = clock(device)
    labels = sample_labels(args.seed, indices)
    latents, _ = sample_latents(model, labels, args.ddim_steps, args.classifier_scale, eta=args.ddim_eta,
                                faster_diffusion=plan, generators=sample_generators(args.seed, indices),
                                precision=args.precision)
    sampled = clock(device)
    images = to_uint8(decode_latents(model, latents, args.precision)).cpu().numpy()
    return images, labels.numpy(), sampled - start, clock(device) - sampled


def read_shard(path, indices, shape):
    """(images, labels) of a shard, checked against the sample indices and image shape it must hold."""
    try:
        with np.load(path) as shard:
            images, labels, stored = shard["images"], shard["labels"], shard["indices"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UsageError(f"shard {path} is unreadable ({e}); delete it and rerun with --resume") from None
    if (images.dtype != np.uint8 or images.shape != (len(indices), *shape)
            or not np.array_equal(stored, np.asarray(indices))):
        raise UsageError(f"shard {path} does not hold samples {indices.start}..{indices.stop - 1}; "
                         "delete it and rerun with --resume")
    return images, labels.astype(np.int64)


def merge_shards(shard_dir, out_path, settings):
    """Write the ADM .npz (as np.savez: arr_0 images, arr_1 labels) one shard at a time, then drop the shards."""
    n, b, shape = settings["num_samples"], settings["batch_size"], tuple(settings["image_shape"])
    labels = np.empty(n, dtype=np.int64)

    def write(f):
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": (n, *shape)}
                np.lib.format.write_array_header_1_0(member, header)
                for k in range((n + b - 1) // b):
                    indices = batch_range(k, b, n)
                    images, labels[indices.start:indices.stop] = read_shard(
                        shard_dir / f"batch_{k:06d}.npz", indices, shape)
                    member.write(images.tobytes())
            with zf.open("arr_1.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels)

    write_atomic(out_path, write)
    shutil.rmtree(shard_dir)


def summary(made, n, processes, wall, sample_s, decode_s, out_path):
    """One line: seconds per image (per process) for sampling and decoding, images per second overall."""
    def per_image(seconds):
        return f"{seconds / made:.4f} s/img" if made else "n/a"
    return (f"made {made} of {n} images with {processes} process(es) in {wall:.1f} s: sampling {per_image(sample_s)}, "
            f"decoding {per_image(decode_s)} (per process), {made / wall if wall else 0:.3f} img/s overall; "
            f"wrote {out_path}")


def setup(args, comm):
    """Check the flags (rank 0), load the model (every rank), record the settings; exits on bad input."""
    settings = paths = error = None
    if comm.rank == 0:
        try:
            settings = check_inputs(args)
            paths = output_paths(args, settings)
        except UsageError as e:
            error = str(e)
    error, settings, paths = comm.bcast((error, settings, paths))
    exit_on_error(comm, [error])

    device = torch.device(args.device or default_device(comm.rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif comm.size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // comm.local_size()))
    model = None
    try:
        model = load_model(args.config_path, args.model_path, device=device, allow_pickle=args.allow_pickle)
        optimize_for_inference(model, channels_last=args.channels_last, compile=args.compile)
    except (ValueError, OSError, KeyError, TypeError, ImportError) as e:
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
    exit_on_error(comm, comm.allgather(error))
    if comm.rank == 0:
        start_shards(paths[1], settings)
    comm.bcast(None)  # the shard dir exists for every rank from here on
    return settings, *paths, model


def sample_batches(args, comm, model, settings, shard_dir):
    """Sample this rank's unfinished batches into shards, with one bar on rank 0 for all ranks' shards.

    Returns (sampling seconds, decoding seconds, images made) of this rank and the wall time of all ranks.
    """
    n, b = args.num_samples, args.batch_size
    plan = make_plan(args)
    bar = tqdm(total=n, unit="img", desc="sampling", disable=args.tqdm_disable or comm.rank != 0, dynamic_ncols=True)

    def refresh():
        """Show the samples in all finished shards, whichever rank wrote them."""
        if not bar.disable:
            bar.update(sum(len(batch_range(k, b, n)) for k in finished_batches(shard_dir)) - bar.n)

    refresh()
    start = time.perf_counter()
    sample_s = decode_s = 0.0
    made = written = 0
    for k in range(comm.rank, (n + b - 1) // b, comm.size):
        shard = shard_dir / f"batch_{k:06d}.npz"
        if shard.exists():
            continue
        indices = batch_range(k, b, n)
        images, labels, ts, td = sample_batch(model, indices, args, plan)
        if images.shape[1:] != tuple(settings["image_shape"]):
            raise RuntimeError(f"model makes images of shape {images.shape[1:]}, config says {settings['image_shape']}")
        write_atomic(shard, lambda f: np.savez(f, images=images, labels=labels, indices=np.asarray(indices)))
        sample_s, decode_s, made, written = sample_s + ts, decode_s + td, made + len(indices), written + 1
        refresh()
        if args.stop_after_batches is not None and written >= args.stop_after_batches:
            print(f"stopping after {written} batches (--stop_after_batches)", file=sys.stderr, flush=True)
            comm.abort(STOPPED_EXIT_CODE)
    comm.wait_all(poll=refresh)
    refresh()
    bar.close()
    return sample_s, decode_s, made, time.perf_counter() - start


def sample(args, comm):
    """The run: set up, sample every rank's batches into shards, merge them on rank 0, print a summary."""
    settings, out_path, shard_dir, model = setup(args, comm)
    *own, wall = sample_batches(args, comm, model, settings, shard_dir)
    stats = comm.gather(own)
    error = None
    if comm.rank == 0:
        try:
            merge_shards(shard_dir, out_path, settings)
        except UsageError as e:
            error = str(e)
    comm.wait_all()
    exit_on_error(comm, [comm.bcast(error)])
    if comm.rank == 0:
        sample_s, decode_s, made = map(sum, zip(*stats))
        print(summary(made, args.num_samples, comm.size, wall, sample_s, decode_s, out_path), flush=True)


def main(args):
    comm = Comm()
    try:
        sample(args, comm)
    except Exception:
        if comm.size > 1:  # one rank failing alone would leave the others waiting forever
            traceback.print_exc()
            sys.stderr.flush()
            comm.abort(1)
        raise


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", default="configs/latent-diffusion/cin256-v2.yaml")
    parser.add_argument("--model_path", default="models/ldm/cin256-v2/model.ckpt")
    parser.add_argument("--num_samples", type=int, default=50000)
    parser.add_argument("--batch_size", type=int, default=16, help="samples per batch and per shard")
    parser.add_argument("--classifier_scale", type=float, default=1.5, help="classifier-free guidance scale")
    parser.add_argument("--ddim_eta", type=float, default=0.0)
    parser.add_argument("--ddim_steps", type=int, default=250)
    parser.add_argument("--tqdm_disable", type=str2bool, default=False)
    parser.add_argument("--use_faster_diffusion", type=str2bool, default=False)
    parser.add_argument("--output_dir", default=None,
                        help="default: output_ldm_eval, or output_ldm_fdiffusion_eval with FasterDiffusion")
    parser.add_argument("--seed", type=int, default=0, help="labels and noise of sample i depend on (seed, i)")
    parser.add_argument("--key_steps", default="ldm250",
                        help="FasterDiffusion key steps: ldm250, ldm250-fast, uniform:N, or loop indices '0,5,10'")
    parser.add_argument("--context_layout", choices=CONTEXT_LAYOUTS, default="paired",
                        help="FasterDiffusion decoder context: paired, or reference (the published fork's)")
    parser.add_argument("--max_decoder_batch", type=int, default=None,
                        help="FasterDiffusion: at most this many decoder rows per call (bounds memory)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--channels_last", action="store_true", help="NHWC convolutions (often faster)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU; slow first call)")
    parser.add_argument("--device", default=None, help="default: cuda:{rank %% GPUs} if CUDA is available, else cpu")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the shards of an interrupted run (made with the same settings)")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="allow checkpoints holding pickled Python objects (only for files you trust)")
    parser.add_argument("--stop_after_batches", type=int, default=None,
                        help=f"for testing: stop with exit status {STOPPED_EXIT_CODE} after this process has "
                             "written this many batches, as if the run were killed")
    return parser


if __name__ == "__main__":
    args = create_argparser().parse_args()
    if args.output_dir is None:
        args.output_dir = "output_ldm_fdiffusion_eval" if args.use_faster_diffusion else "output_ldm_eval"
    main(args)
