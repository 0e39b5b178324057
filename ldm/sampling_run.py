"""The sampling run: a mode sampled into a resumable ADM-format .npz, under MPI or in one process.

Sample i gets its label and noise from (seed, i) alone, so the images depend only on the settings, not on the
batch size or the number of processes (up to float rounding). Batch k holds samples [k*B, (k+1)*B); process r does
the batches r, r+R, r+2R, ... and writes each finished batch as a shard; process 0 merges them into the .npz and
records the settings beside it (`ldm.shards` has the layout). A run holds its folder (`ldm.shards.FolderLock`),
verifies a finished .npz before it calls it done, continues an interrupted run from its shards with --resume, and
stops with one line (and an exit status) at any fault. `parse_args` reads `scripts/image_sample.py`'s flags; `sample`
runs them.
"""
import contextlib
import shutil
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ldm import cli
from ldm.autobatch import AUTO_BATCH, auto_batch_size
from ldm.distributed import first_error
from ldm.models.diffusion.caches import CACHES
from ldm.sampling import decode_latents, image_shape, num_classes, sample_generators, sample_labels, sample_latents
from ldm.sampling import to_uint8
from ldm.shards import (FolderLock, RunFiles, batch_range, check_samples, default_output_dir, finished_batches,
                        previous_run, read_settings, remove_stale_temporaries, write_samples, write_settings,
                        write_shard)
from ldm.util import file_sha256

STOPPED_EXIT_CODE = 3
OUT_OF_MEMORY_EXIT_CODE = 4
WRITE_FAILED_EXIT_CODE = 5
INTERRUPT_GRACE_SECONDS = 1.0


def check_run(args, model=None):
    """Every check that needs no weights: flags, files, the model's structure and what output_dir holds. model: the
    config's model as `cli.inspect_model` builds it, where the caller has it (the frontier checks many modes of one).

    Returns (settings, files, state of an earlier run: fresh, resume, restart or done, the checked mode). `sample`
    reads the state again once it holds the folder.
    """
    cli.check_files(args)
    cli.check_sampling(args)
    mode = cli.make_mode(args)
    device = cli.check_device(args)
    auto_batch = args.batch_size == AUTO_BATCH
    if auto_batch and device.type != "cuda":
        raise cli.UsageError("--batch_size auto fits the batch to a GPU's free memory: give a number on the CPU")
    batch_size = None if auto_batch else args.batch_size
    for flag, value in (("--num_samples", args.num_samples), ("--batch_size", batch_size),
                        ("--stop_after_batches", args.stop_after_batches)):
        if value is not None and value < 1:
            raise cli.UsageError(f"{flag} must be at least 1, not {value}")
    if args.output_dir == "":
        raise cli.UsageError("--output_dir is empty: give a folder, or leave the flag out for the default")
    model = model or cli.inspect_model(args)
    cli.check_mode_fits(mode, model, args.steps)
    settings = run_settings(args, model, mode)
    output_dir = args.output_dir if args.output_dir is not None else default_output_dir(settings, args.config)
    cli.check_writable_folder(output_dir, "--output_dir")
    files = RunFiles(output_dir, args.num_samples, settings["image_shape"])
    try:
        settings, state = run_state(args, settings, files)
    except cli.UsageError:  # what it saw may be another run's work in progress: look again, holding the folder
        with FolderLock(files.output_dir):
            settings, state = run_state(args, settings, files)
    return settings, files, state, mode


def run_state(args, settings, files):
    """(settings, what output_dir holds for them: fresh, resume, restart or done; see ldm.shards.previous_run).
    A resumed run takes its batch size (when auto) and calibrated steps from its shards' record."""
    settings = dict(settings)
    if args.resume:
        shards = read_settings(files.shard_settings) or {}
        if args.batch_size == AUTO_BATCH:  # the shards' batch size, which placed them
            settings["batch_size"] = shards.get("batch_size", AUTO_BATCH)
        if "calibrated_steps" in shards:  # the steps that the shards' 'auto:K' was calibrated to
            settings["calibrated_steps"] = shards["calibrated_steps"]
    return settings, previous_run(files, settings, resume=args.resume, overwrite=args.overwrite)


def run_settings(args, model, mode):
    """What defines the images (checkpoint and config by content), and the batch size that places the shards.

    DDIM and FasterDiffusion runs are recorded as before other solvers and caches existed (so their records
    and default folders still match: "faster_diffusion" is null without it); the other modes add what defines
    them. 'auto:K' steps are recorded as asked (Cache.record), their loop indices as calibrated_steps (see
    calibrate_once).
    """
    settings = {
        "config_sha256": file_sha256(args.config, cache_from_bytes=None),
        "checkpoint_sha256": file_sha256(args.ckpt),
        "image_shape": list(image_shape(model)),
        "num_samples": args.num_samples,
        "seed": args.seed,
        "steps": args.steps,
        "eta": args.eta,
        "scale": args.scale,
        "precision": args.precision,
        "faster_diffusion": None,
        "batch_size": args.batch_size,
    }
    if args.save_latents:  # recorded only when saved, so that earlier runs' records still match
        settings.update(save_latents=True, latent_shape=[model.channels, model.image_size, model.image_size])
    if mode.sampler != "ddim":
        settings["sampler"] = mode.sampler
    if mode.is_dpm:
        settings.update(skip_type=mode.skip_type, lower_order_final=mode.lower_order_final)
    settings.update(mode.plan.record(args.steps))
    return settings


def calibrate_once(comm, args, model, settings, mode):
    """The checked mode, its 'auto:K' steps calibrated on rank 0 and recorded in settings['calibrated_steps'], or,
    when resuming, taken from there (the steps the shards were sampled with)."""
    if mode.plan.calibrating() is None:
        return mode
    if "calibrated_steps" not in settings:
        settings["calibrated_steps"] = collective(
            comm, lambda: [int(i) for i in cli.calibrate(mode, model, args).cache.steps_for(args.steps)])
    return mode.with_steps(settings["calibrated_steps"])


def compile_in_turn(comm, model, args, mode):
    """--compile on every rank, rank 0 first: it fills the compile cache on disk, from which the other ranks then
    load the compiled code instead of all generating it at once. Returns rank 0's line (None on the others and
    without --compile)."""
    if not args.compile:
        return None
    line = cli.compile_for(model, args, [mode], args.batch_size) if comm.rank == 0 else None
    comm.wait_all()
    start = time.perf_counter()
    if comm.rank != 0:
        cli.compile_for(model, args, [mode], args.batch_size)
    others = comm.gather(time.perf_counter() - start)
    if comm.rank != 0:
        return None
    if comm.size > 1:
        line += f"; the other {comm.size - 1} process(es) then took at most {max(others[1:]):.1f} s"
    return line


def prepare_output(files, settings, state):
    """Create output_dir, drop shards to start over and temporary files of killed runs, record the settings. An
    OSError here (a full disk) is a failed write, as during sampling."""
    files.output_dir.mkdir(parents=True, exist_ok=True)
    if state == "restart":
        shutil.rmtree(files.shard_dir)
    for folder in (files.output_dir, files.shard_dir):
        remove_stale_temporaries(folder)
    files.shard_dir.mkdir(exist_ok=True)
    write_settings(files.shard_settings, settings)


def resolve_batch_size(comm, args, model, mode):
    """--batch_size auto: the largest batch that fits every rank's GPU (each probes its own), said in one line."""
    limit = -(-args.num_samples // comm.size)
    batch_size = min(comm.allgather(auto_batch_size(model, mode, args.steps, args.scale != 1, args.precision, limit)))
    if comm.rank == 0:
        print(f"--batch_size auto: {batch_size} samples per batch" if batch_size else
              "error: --batch_size auto: not even one sample fits the GPU's free memory", file=sys.stderr, flush=True)
    if not batch_size:
        sys.exit(cli.BAD_INPUT)
    return batch_size


def collective(comm, step, everywhere=False):
    """Run step() on rank 0 (or on every rank) and share its result; a UsageError on any rank is printed once
    by rank 0 and every rank exits with status BAD_INPUT."""
    result = error = None
    if everywhere or comm.rank == 0:
        try:
            result = step()
        except cli.UsageError as e:
            error = str(e)
    error = first_error(comm, error)
    if error:
        if comm.rank == 0:
            cli.report(error)
        sys.exit(cli.BAD_INPUT)
    return result if everywhere else comm.bcast(result)


def fail(comm, message, status):
    """Print one error line from this rank; under MPI end every rank (the others would wait for this one
    forever), else return (status, None)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if comm.size > 1:
        comm.abort(status)
    return status, None


def on_rank(comm):
    """' on rank R' when there are several processes, else ''."""
    return f" on rank {comm.rank}" if comm.size > 1 else ""


def clock(device):
    """Wall-clock time after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class NotFinite(Exception):
    """A batch whose latents or images became NaN or infinite."""


def sample_batch(model, indices, args, mode):
    """Sample indices -> (uint8 NHWC images, labels, float32 latents with --save_latents else None, sampling seconds,
    decoding seconds); NotFinite names the first
    step whose latents are NaN or infinite (checked on the device, read once per batch)."""
    start = clock(model.device)
    labels = sample_labels(args.seed, indices, num_classes(model))
    finite = []
    latents, _ = sample_latents(model, labels, args.steps, args.scale, mode=mode,
                                generators=sample_generators(args.seed, indices), precision=args.precision,
                                step_callback=lambda step, t, x, pred_x0: finite.append(torch.isfinite(x).all()))
    sampled = clock(model.device)
    where = f"samples {indices.start}..{indices.stop - 1}"
    if finite and not bool(torch.stack(finite).all()):
        step = int((~torch.stack(finite)).nonzero()[0])
        raise NotFinite(f"{where}: the latents are NaN or infinite from step {step + 1} of {len(finite)} on")
    images = decode_latents(model, latents, args.precision)
    if not bool(torch.isfinite(images).all()):
        raise NotFinite(f"{where}: the decoded images are NaN or infinite")
    images = to_uint8(images).cpu().numpy()
    kept = latents.float().cpu().numpy() if args.save_latents else None
    return images, labels.numpy(), kept, sampled - start, clock(model.device) - sampled


def sample_shards(args, comm, model, mode, files):
    """Sample this rank's missing batches into shards, with one bar on rank 0 for all ranks' shards.

    Returns (sampling seconds, decoding seconds, images made) of this rank and the wall time of all ranks.
    """
    n, b = args.num_samples, args.batch_size
    bar = tqdm(total=n, unit="img", desc="sampling", disable=args.tqdm_disable or comm.rank != 0, dynamic_ncols=True)

    def refresh():
        """Show the samples in all finished shards, whichever rank wrote them."""
        if not bar.disable:
            bar.update(sum(len(batch_range(k, b, n)) for k in finished_batches(files.shard_dir)) - bar.n)

    refresh()
    start = time.perf_counter()
    sample_s = decode_s = 0.0
    made = written = 0
    for k in range(comm.rank, (n + b - 1) // b, comm.size):
        if files.shard(k).exists():
            continue
        indices = batch_range(k, b, n)
        images, labels, latents, ts, td = sample_batch(model, indices, args, mode)
        write_shard(files.shard(k), images, labels, indices, latents)
        sample_s, decode_s, made, written = sample_s + ts, decode_s + td, made + len(indices), written + 1
        refresh()
        if args.stop_after_batches is not None and written >= args.stop_after_batches:
            print(f"stopping after {written} batches (--stop_after_batches)", file=sys.stderr, flush=True)
            comm.abort(STOPPED_EXIT_CODE)
    comm.wait_all(poll=refresh)
    refresh()
    bar.close()
    return sample_s, decode_s, made, time.perf_counter() - start


def summary(made, n, processes, wall, sample_s, decode_s, path):
    """One line: seconds per image (per process) for sampling and decoding, images per second overall."""
    def per_image(seconds):
        return f"{seconds / made:.4f} s/img" if made else "n/a"
    return (f"made {made} of {n} images with {processes} process(es) in {wall:.1f} s: sampling {per_image(sample_s)}, "
            f"decoding {per_image(decode_s)} (per process), {made / wall if wall else 0:.3f} img/s overall; "
            f"wrote {path}")


@dataclass
class Outcome:
    """What a run did: its files, whether they were already done, and (rank 0, when it sampled) the resolved mode,
    the images made and their sampling seconds summed over processes (decoding excluded)."""
    files: RunFiles
    already_done: bool
    mode: object = None
    images: int = 0
    sample_seconds: float = 0.0


def sample(args, comm, rerun="rerun the same command with --resume", load=cli.load):
    """Check, hold the folder, load, sample the missing batches, merge; returns (exit status, Outcome or None if
    stopped). rerun: what the lines of an interrupted run say continues it; load(args, device): the model (a caller
    that runs several modes may keep its models)."""
    collective(comm, lambda: cli.apply_mode_flag(args), everywhere=True)  # --mode sets the flags it names
    settings, files, _, mode = collective(comm, lambda: check_run(args))
    try:
        with hold_folder(comm, files.output_dir):
            return sample_in_folder(args, comm, settings, files, mode, load)
    except KeyboardInterrupt as interrupt:
        total = "?" if args.batch_size == AUTO_BATCH else -(-args.num_samples // args.batch_size)
        line = f"stopped: {saved_batches(files)} of {total} batches are saved in {files.shard_dir}; {rerun} to continue"
        return stop(comm, line, cli.interrupt_exit_status(interrupt)), None
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        device = "GPU" if isinstance(e, torch.OutOfMemoryError) else "CPU"
        when = "before sampling" if args.batch_size == AUTO_BATCH else f"at batches of {args.batch_size} samples"
        bounded = any(o.name == "max_decoder_batch" for o in CACHES[args.cache].options)
        hint = ", or a smaller --max_decoder_batch" if bounded else ""
        saved = saved_batches(files)
        rerun = f"{saved} finished batches are saved in {files.shard_dir}: rerun with a smaller --batch_size and " \
            "--overwrite" if saved else "rerun with a smaller --batch_size"
        return fail(comm, f"the {device} ran out of memory {when}{on_rank(comm)}; {rerun}{hint}",
                    OUT_OF_MEMORY_EXIT_CODE)
    except OSError as e:  # e.g. the disk is full: what is written stays whole, and --resume continues from it
        saved = saved_batches(files)
        how = f"{saved} finished batches are saved in {files.shard_dir}: {rerun}" if saved else \
            "nothing was sampled: rerun the same command once it can write there"
        return fail(comm, f"cannot write {e.filename or 'the samples'}{on_rank(comm)}: {e.strerror or e}; {how}",
                    WRITE_FAILED_EXIT_CODE)
    except NotFinite as e:
        return fail(comm, f"{e}{on_rank(comm)}: these settings or this checkpoint cannot give finite samples; "
                          "nothing of this batch was written", cli.BAD_INPUT)


@contextlib.contextmanager
def hold_folder(comm, folder):
    """Rank 0 holds output_dir for the whole run (`FolderLock`); a folder that another run holds is refused."""
    with contextlib.ExitStack() as stack:
        collective(comm, lambda: stack.enter_context(FolderLock(folder)) and None)
        yield


def sample_in_folder(args, comm, settings, files, mode, load):
    """sample() once the run holds its folder: what it holds is read again, now that no other run can change it."""
    settings, state = collective(comm, lambda: run_state(args, settings, files))
    if state == "done":
        collective(comm, lambda: check_samples(files, read_settings(files.record)))
        if comm.rank == 0:
            print(f"already done: {files.samples} holds these samples (settings in {files.record}); "
                  f"pass --overwrite to sample them again\nsamples: {files.samples}", flush=True)
        return 0, Outcome(files, already_done=True)
    model = collective(comm, lambda: load(args, cli.check_device(args, comm.rank)), everywhere=True)
    mode = calibrate_once(comm, args, model, settings, mode)
    if settings["batch_size"] == AUTO_BATCH:
        settings["batch_size"] = resolve_batch_size(comm, args, model, mode)
    args.batch_size = settings["batch_size"]
    collective(comm, lambda: prepare_output(files, settings, state))
    compiled = compile_in_turn(comm, model, args, mode)
    if compiled:
        print(compiled, file=sys.stderr, flush=True)
    *own, wall = sample_shards(args, comm, model, mode, files)
    stats = comm.gather(own)
    collective(comm, lambda: write_samples(files, settings))
    if comm.rank != 0:
        return 0, Outcome(files, already_done=False, mode=mode)
    sample_s, decode_s, made = map(sum, zip(*stats))
    print(summary(made, args.num_samples, comm.size, wall, sample_s, decode_s, files.samples))
    print(f"samples: {files.samples}", flush=True)
    return 0, Outcome(files, already_done=False, mode=mode, images=made, sample_seconds=sample_s)


def saved_batches(files):
    """How many finished batches the shard folder holds."""
    return len(finished_batches(files.shard_dir))


def out_of_memory(error):
    """Whether an error is a device running out of memory: CUDA's OutOfMemoryError or the CPU allocator's."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)


def stop(comm, line, status):
    """End the run after Ctrl-C or SIGTERM with one line; under MPI, end every rank with it. When a rank other than
    0 is interrupted it waits a moment first: if every rank was (Ctrl-C to mpiexec), rank 0 speaks and ends them
    all, so the line is printed once."""
    if comm.rank != 0:
        time.sleep(INTERRUPT_GRACE_SECONDS)
    print(line, file=sys.stderr, flush=True)
    if comm.size > 1:
        comm.abort(status)
    return status


def parse_args(argv=None, description=None):
    parser = cli.Parser(description=description)
    cli.add_model_args(parser)
    cli.add_sampling_args(parser)
    cli.add_mode_args(parser)
    cli.add_device_args(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--num_samples", type=int, default=50000)
    run.add_argument("--batch_size", type=cli.batch_size_arg, default=16,
                     help="samples per batch and per shard, or auto: the largest batch that fits the GPU")
    run.add_argument("--output_dir", default=None,
                     help="default: outputs/samples/<model>_<mode><steps>_scale<s>_seed<n>_<digest of the settings>")
    run.add_argument("--resume", action="store_true",
                     help="continue from the shards of an interrupted run (made with the same settings)")
    run.add_argument("--overwrite", action="store_true",
                     help="start over: replace a finished .npz (once the new one is complete) and discard shards")
    run.add_argument("--save_latents", action="store_true",
                     help="keep the final latents beside the images (`latents` in the .npz; evaluations/fidelity.py "
                          "compares them)")
    run.add_argument("--stop_after_batches", type=int, default=None,
                     help=f"for testing: stop with exit status {STOPPED_EXIT_CODE} after this process has "
                          "written this many batches, as if the run were killed")
    parser.set_defaults(scale=1.5, key_steps="ldm250", cache="none")  # the published sampling script's
    return parser.parse_args(argv)
