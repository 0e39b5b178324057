"""The files of a sampling run: per-batch shards, the merged ADM .npz, and the settings each was made with.

    <output_dir>/shards_<N>x<H>x<W>x<C>/batch_<k>.npz   samples [k*B, (k+1)*B): images, labels, indices
    <output_dir>/shards_<N>x<H>x<W>x<C>/settings.json   the settings the shards are made with
    <output_dir>/samples_<N>x<H>x<W>x<C>.npz            arr_0 uint8 NHWC images, arr_1 int64 labels (ADM); with
                                                        --save_latents, latents: float32 final latents NCHW
    <output_dir>/samples_<N>x<H>x<W>x<C>.json           the settings the .npz was made with, and its checksum
    <output_dir>/.lock                                  held by the process that runs in the folder

Every file is written under a temporary name and renamed into place (`ldm.util.write_atomic`).
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np

from ldm.cli import UsageError, first_line
from ldm.models.diffusion.caches import CACHES
from ldm.util import model_name, write_atomic

SHARD_NAME = re.compile(r"batch_(\d+)\.npz")
# Temporary files of write_atomic for the files above: `.NAME.HOST.PID.tmp` (older versions: `.NAME.PID.tmp`).
TEMPORARY_NAME = re.compile(r"\.(samples_\d+(x\d+)+\.(npz|json)|batch_\d+\.npz|settings\.json)(\.(?P<host>.+))?"
                            r"\.(?P<pid>\d+)\.tmp")
SHARD_ONLY_SETTINGS = ("batch_size",)  # settings that place the shard boundaries but do not change the images
# settings that follow from the others: the steps that 'auto:K' was calibrated to (recorded so that a resumed run
# samples with the same steps instead of calibrating again)
DERIVED_SETTINGS = ("calibrated_steps",)
# what the record says of the .npz itself: the SHA-256 of its arrays' bytes (arr_0, arr_1, then latents if saved)
OUTPUT_FACTS = ("samples_sha256",)
LOCK_NAME = ".lock"
READ_CHUNK = 64 << 20


class RunFiles:
    """Paths of the run that writes num_samples images of image_shape into output_dir."""

    def __init__(self, output_dir, num_samples, image_shape):
        name = "x".join(map(str, [num_samples, *image_shape]))
        self.output_dir = Path(output_dir)
        self.samples = self.output_dir / f"samples_{name}.npz"
        self.record = self.output_dir / f"samples_{name}.json"
        self.shard_dir = self.output_dir / f"shards_{name}"
        self.shard_settings = self.shard_dir / "settings.json"

    def shard(self, k):
        return self.shard_dir / f"batch_{k:06d}.npz"


def default_output_dir(settings, config_path, root="outputs/samples"):
    """A folder named after the model and the main settings plus a digest of all of them: runs with other
    settings never share it."""
    images = {k: v for k, v in settings.items() if k not in SHARD_ONLY_SETTINGS + DERIVED_SETTINGS}
    digest = hashlib.sha256(json.dumps(images, sort_keys=True).encode()).hexdigest()[:10]
    mode = mode_name(settings)
    name = f"{model_name(config_path)}_{mode}{settings['steps']}_scale{settings['scale']:g}_seed{settings['seed']}"
    return str(Path(root) / f"{name}_{digest}")


def mode_name(settings):
    """The sampling mode in a folder name: 'ddim' and 'fd' (DDIM with FasterDiffusion) as before other modes
    existed, else SAMPLER[-CACHE], e.g. 'plms', 'dpmpp2m-deepcache', 'ddim-deepcache'."""
    sampler = settings.get("sampler", "ddim")
    cache = next((name for name, cls in CACHES.items() if settings.get(cls.record_key or name)), None)
    if sampler == "ddim" and cache in (None, "fd"):
        return cache or "ddim"
    return "-".join(filter(None, (sampler, cache)))


# ----------------------------------------------------------------------------------------------------------
# Settings records


def read_settings(path):
    """The settings stored at path, or None if there is no readable record."""
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def missing_or_unreadable(path):
    """Why there are no settings at path: 'no record' or 'an unreadable record'."""
    return "an unreadable record" if Path(path).exists() else "no record"


def write_settings(path, settings):
    write_atomic(path, lambda f: f.write((json.dumps(settings, indent=1) + "\n").encode()))


def differences(old, new, ignore=()):
    """'name: old -> new' for each setting that differs, one that only one of them has included."""
    names = list(new) + [k for k in old if k not in new]
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in names if k not in ignore and old.get(k) != new.get(k)]


def previous_run(files, settings, resume=False, overwrite=False):
    """What output_dir holds for this run: 'done' (the .npz with these settings), 'resume' (shards to continue),
    'restart' (shards to delete: --overwrite) or 'fresh'. Anything else is a UsageError naming what differs."""
    for path, kind in ((files.samples, "a directory"), (files.record, "a directory"), (files.shard_dir, "a file")):
        if path.exists() and path.is_dir() == (kind == "a directory"):
            raise UsageError(f"{path} is {kind}, in the way of this run's files; move it or choose another --output_dir")
    if files.samples.exists() and not overwrite:
        old = read_settings(files.record)
        if old is None:
            raise UsageError(f"{files.samples} exists with {missing_or_unreadable(files.record)} of its settings "
                             f"({files.record.name}); pass --overwrite to replace it, or choose another --output_dir")
        changed = differences(old, settings, ignore=SHARD_ONLY_SETTINGS + DERIVED_SETTINGS + OUTPUT_FACTS)
        if not changed:
            return "done"
        shards = read_settings(files.shard_settings) if finished_batches(files.shard_dir) else None
        resumable = shards is not None and not differences(shards, settings, ignore=DERIVED_SETTINGS)
        how = "--overwrite --resume to replace it, continuing the saved batches of an interrupted --overwrite run" \
            if resumable else "--overwrite to replace it"
        raise UsageError(f"{files.samples} was made with other settings ({'; '.join(changed)}); "
                         f"pass {how}, or choose another --output_dir")
    done = finished_batches(files.shard_dir)
    if not done:
        return "fresh"
    old = read_settings(files.shard_settings)
    changed = None if old is None else differences(old, settings, ignore=DERIVED_SETTINGS)
    if resume and changed == []:
        return "resume"
    if overwrite:
        return "restart"
    if old is None:
        raise UsageError(f"{files.shard_dir} holds shards but {missing_or_unreadable(files.shard_settings)} of "
                         "their settings (settings.json); pass --overwrite to start over")
    if not resume:
        raise UsageError(f"{files.shard_dir} holds {len(done)} finished batches of an earlier run; "
                         "pass --resume to continue it, or --overwrite to start over")
    raise UsageError(f"cannot --resume from {files.shard_dir}: its shards were made with other settings "
                     f"({'; '.join(changed)}); pass --overwrite to start over")


# ----------------------------------------------------------------------------------------------------------
# Shards


def finished_batches(shard_dir):
    """Batch numbers whose shard exists."""
    if not Path(shard_dir).is_dir():
        return set()
    return {int(m.group(1)) for m in map(SHARD_NAME.fullmatch, os.listdir(shard_dir)) if m}


def batch_range(k, batch_size, num_samples):
    """Sample indices of batch k."""
    return range(k * batch_size, min((k + 1) * batch_size, num_samples))


def write_shard(path, images, labels, indices, latents=None):
    arrays = dict(images=images, labels=labels, indices=np.asarray(indices))
    if latents is not None:
        arrays["latents"] = latents
    write_atomic(path, lambda f: np.savez(f, **arrays))


def read_shard(path, indices, shape, latent_shape=None):
    """(images, labels, latents or None) of a shard, checked against the sample indices, image shape and (when
    latents are saved) latent shape it must hold."""
    try:
        with np.load(path) as shard:
            images, labels, stored = shard["images"], shard["labels"], shard["indices"]
            latents = shard["latents"] if latent_shape is not None else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UsageError(f"shard {path} is unreadable ({first_line(e)}); delete it and rerun with --resume") from None
    if (images.dtype != np.uint8 or images.shape != (len(indices), *shape)
            or not np.array_equal(stored, np.asarray(indices))
            or latents is not None and (latents.dtype != np.float32 or latents.shape != (len(indices), *latent_shape))):
        raise UsageError(f"shard {path} does not hold samples {indices.start}..{indices.stop - 1}; "
                         "delete it and rerun with --resume")
    return images, labels.astype(np.int64), latents


def _npy_member(zf, name, dtype, shape):
    """An .npy member of a zip being written: its header written, the open member returned for the data."""
    member = zf.open(name, "w", force_zip64=True)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(member, header)
    return member


def write_samples(files, settings):
    """Merge the shards, one at a time, into the ADM .npz (as np.savez: arr_0 images, arr_1 labels), record its
    settings and checksum beside it, then delete the shards. A previous .npz is replaced only when the new one is
    complete."""
    n, b, shape = settings["num_samples"], settings["batch_size"], tuple(settings["image_shape"])
    latent_shape = tuple(settings["latent_shape"]) if settings.get("save_latents") else None
    batches = range((n + b - 1) // b)
    labels = np.empty(n, dtype=np.int64)
    checksum = hashlib.sha256()

    def write(f):
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with _npy_member(zf, "arr_0.npy", np.uint8, (n, *shape)) as member:
                for k in batches:
                    indices = batch_range(k, b, n)
                    images, labels[indices.start:indices.stop], _ = read_shard(files.shard(k), indices, shape)
                    member.write(images.tobytes())
                    checksum.update(images.tobytes())
            with zf.open("arr_1.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels)
                checksum.update(labels.tobytes())
            if latent_shape is not None:  # a second pass over the shards, so that memory stays at one batch
                with _npy_member(zf, "latents.npy", np.float32, (n, *latent_shape)) as member:
                    for k in batches:
                        latents = read_shard(files.shard(k), batch_range(k, b, n), shape, latent_shape)[2]
                        member.write(latents.tobytes())
                        checksum.update(latents.tobytes())

    files.record.unlink(missing_ok=True)  # never a record that describes another .npz
    write_atomic(files.samples, write)
    write_settings(files.record, {**settings, "samples_sha256": checksum.hexdigest()})
    shutil.rmtree(files.shard_dir)


def _stream_member(zf, name, dtype, shape, checksum):
    """Read an .npy member of an open .npz in chunks into checksum, checking its dtype and shape."""
    with zf.open(name) as member:  # zipfile checks the member's CRC-32 once it is read to the end
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        stored_shape, fortran_order, stored_dtype = read_header(member)
        if stored_dtype != dtype or tuple(stored_shape) != shape or fortran_order:
            raise ValueError(f"{name} holds {stored_dtype} {tuple(stored_shape)}, not {np.dtype(dtype)} {shape}")
        left = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        while left:
            chunk = member.read(min(left, READ_CHUNK))
            if not chunk:
                raise ValueError(f"{name} ends early")
            checksum.update(chunk)
            left -= len(chunk)
        if member.read(1):
            raise ValueError(f"{name} is longer than its header says")


def check_samples(files, record):
    """The finished .npz holds what its record says (the count and image shape, and the checksum where the record
    has one), read to the end; anything else is a UsageError saying how to sample it again."""
    n, shape = record["num_samples"], tuple(record["image_shape"])
    checksum = hashlib.sha256()
    try:
        with zipfile.ZipFile(files.samples) as zf:
            _stream_member(zf, "arr_0.npy", np.uint8, (n, *shape), checksum)
            _stream_member(zf, "arr_1.npy", np.int64, (n,), checksum)
            if record.get("save_latents"):
                _stream_member(zf, "latents.npy", np.float32, (n, *record["latent_shape"]), checksum)
        if record.get("samples_sha256", checksum.hexdigest()) != checksum.hexdigest():
            raise ValueError("its contents do not match the checksum in its record")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{files.samples} is damaged ({first_line(e)}); pass --overwrite to sample it again") \
            from None


# ----------------------------------------------------------------------------------------------------------
# The folder's owner


class FolderLock:
    """An exclusive hold on a run's output folder, so that no two runs write in it at once: a `flock` on
    `<folder>/.lock`, which holds the owner's host and process id while the run lasts. The kernel drops the lock
    when its process ends, however it ends, so a dead run's lock file is never in the way. Entering creates the
    folder; leaving removes the lock file, and the folders it created if the run wrote nothing in them."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd = None
        self.created = []

    def __enter__(self):
        missing = self.folder
        while not missing.exists():
            self.created.append(missing)
            missing = missing.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                who = f"process {owner[1]} on {owner[0]}" if len(owner) == 2 else "another process"
                raise UsageError(f"{self.folder} is in use by another run ({who}); wait for it to end, or choose "
                                 "another --output_dir") from None
            if _same_file(fd, self.path):
                self.fd = fd
            else:  # its owner removed it as we opened it: take the new one
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)  # before the lock goes, so that no one takes a lock on a removed file
        os.close(self.fd)
        for folder in self.created:  # innermost first, each only if the run left it empty
            try:
                folder.rmdir()
            except OSError:
                break


def _same_file(fd, path):
    """Whether an open file is still the one at path."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------------------
# Temporary files left by killed runs


def _writer_is_gone(host, pid):
    """Whether the process that named a temporary file has ended (one on another host counts as ended)."""
    if host not in (None, socket.gethostname()):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(folder):
    """Delete the temporary files of this module's kinds in folder whose writer has ended; returns their names."""
    if not Path(folder).is_dir():
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = TEMPORARY_NAME.fullmatch(name)
        if match and _writer_is_gone(match["host"], int(match["pid"])):
            (Path(folder) / name).unlink(missing_ok=True)
            removed.append(name)
    return removed
