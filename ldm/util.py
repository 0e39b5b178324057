"""Building models from configs and loading checkpoints safely and strictly."""
import contextlib
import hashlib
import importlib
import json
import os
import pickle
import socket
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.modules.attention import set_attention

# Entries that upstream checkpoints may carry but that sampling does not use: training-time
# buffers, EMA weights, a stale scale_factor (a plain float upstream unless scale_by_std), and
# the first stage's training loss (discriminator, LPIPS).
IGNORED_CHECKPOINT_KEYS = ("lvlb_weights", "logvar", "scale_factor", "cond_ids")
IGNORED_CHECKPOINT_PREFIXES = ("model_ema.", "first_stage_model.loss.")


class _Unavailable:
    """Stands in for a pickled object whose class cannot be imported (e.g. a training callback)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Unavailable


class _lenient_pickle:
    """pickle module for torch.load that tolerates classes of packages this tool does not install."""
    Unpickler = _LenientUnpickler
    load = pickle.load
    __name__ = "pickle"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model built from the config."""


class ArchitectureMismatch(CheckpointError):
    """A checkpoint whose tensors are not the config's model's: keys missing, unexpected or of another shape."""


def get_obj_from_str(string):
    module, cls = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def instantiate_from_config(config):
    """Build `target(**params)`; the markers __is_first_stage__ and __is_unconditional__ give None."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def _model_config(config_path):
    check_file(config_path, "config")
    try:
        config = OmegaConf.load(config_path)
    except Exception as e:
        raise ValueError(f"cannot read config {config_path}: {e}".splitlines()[0]) from None
    if "model" not in config:
        raise ValueError(f"config {config_path} has no `model` section")
    return config.model


def model_name(config_path):
    """A short name for the model in output paths: the config's file name, or its folder's name when the file
    is a generic `config.yaml` (models/digits32/config.yaml -> digits32)."""
    path = Path(config_path)
    if path.stem == "config":
        return path.parent.resolve().name or path.stem
    return path.stem


def check_file(path, what):
    """Raise FileNotFoundError for a missing path, IsADirectoryError for a folder: `what` names the file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def read_state_dict(ckpt_path, allow_pickle=False):
    """Weights of a `.safetensors` file or a torch checkpoint (Lightning style: under `state_dict`)."""
    check_file(ckpt_path, "checkpoint")
    if ckpt_path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(ckpt_path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt_path} is not a readable safetensors file ({e})") from None
    try:
        if allow_pickle:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
        else:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) and "Unsupported global" in str(e):
            raise CheckpointError(
                f"{ckpt_path} holds pickled Python objects besides tensors; refusing to unpickle them. "
                "If you trust this file, pass --allow_pickle (allow_pickle=True).") from None
        raise CheckpointError(f"{ckpt_path} is not a PyTorch checkpoint or is truncated") from None
    except Exception as e:  # torch.load fails in many ways on foreign or cut files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{ckpt_path} is not a PyTorch checkpoint or is truncated ({reason})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{ckpt_path} holds no state_dict of tensors")
    return checkpoint


def _few(keys, n=3):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_state_dict_strict(model, state_dict, source="checkpoint"):
    """Load every model tensor from state_dict; anything missing, unexpected or misshapen is an error."""
    state_dict = {k: v for k, v in state_dict.items()
                  if k not in IGNORED_CHECKPOINT_KEYS and not k.startswith(IGNORED_CHECKPOINT_PREFIXES)}
    expected = model.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing or unexpected:
        raise ArchitectureMismatch(
            f"{source} does not match the model architecture: {len(missing)} missing keys ({_few(missing)}), "
            f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if state_dict[k].shape != v.shape]
    if wrong:
        raise ArchitectureMismatch(f"{source} has {len(wrong)} tensors of the wrong shape (checkpoint vs model): {_few(wrong, 2)}")
    # as upstream, which copies into float32 parameters: a half- or double-precision checkpoint loads as float32
    state_dict = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)


def build_model(config_path):
    """The model of an upstream LDM config on the meta device: its structure, without weights."""
    config = _model_config(config_path)
    with torch.device("meta"):  # no random initialisation: every tensor comes from the checkpoint
        return instantiate_from_config(config)


def load_model(config_path, ckpt_path, device="cpu", allow_pickle=False):
    """Build the model of an upstream LDM config, load its checkpoint strictly, return it in eval mode."""
    model = build_model(config_path)
    state_dict = read_state_dict(ckpt_path, allow_pickle=allow_pickle)
    load_state_dict_strict(model, state_dict, source=ckpt_path)
    return model.eval().requires_grad_(False).to(device)


def file_sha256(path, cache_from_bytes=64 << 20):
    """SHA-256 of a file's bytes; for files of at least cache_from_bytes (None: never), cached in
    `<path>.sha256.json` beside it and reused while the file's size and mtime match.

    Identifies a checkpoint by content: a copy or a `touch` gives the same hash. Without write access to the
    folder the hash is computed each time.
    """
    stat = os.stat(path)
    cache = cache_from_bytes is not None and stat.st_size >= cache_from_bytes
    cache_path = Path(f"{path}.sha256.json")
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        cached = json.loads(cache_path.read_text()) if cache else {}
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and {k: cached.get(k) for k in key} == key and "sha256" in cached:
        return cached["sha256"]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if cache:
        try:
            write_atomic(cache_path, lambda f: f.write(json.dumps({**key, "sha256": digest}).encode()))
        except OSError:
            pass  # a read-only folder: no cache
    return digest


def temporary_name(path):
    """Hidden name beside path that says which process writes it: `.NAME.HOST.PID.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_atomic(path, write):
    """Call write(file) on a temporary name next to path, then rename it to path: no half-written files.
    Removing the temporary file never masks what went wrong (a parent path that is a file, say)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:  # name the file the caller asked for, not the temporary one
        raise type(e)(e.errno, e.strerror, str(path)) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMALIZATIONS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def check_precision(precision, device):
    """The dtype of a sampling precision: fp32, bf16, or fp16 (GPU only; the meta device, which computes
    nothing, takes all three); anything else is a ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp16" and torch.device(device).type not in ("cuda", "meta"):
        raise ValueError("fp16 needs a CUDA device; use bf16 on CPU")
    return DTYPES[precision]


def autocast(precision, device):
    """Autocast context for a sampling precision: fp32 (exact, no autocast), bf16, or fp16 (GPU only)."""
    dtype = check_precision(precision, device)
    enabled = dtype != torch.float32
    return torch.autocast(torch.device(device).type, dtype=dtype if enabled else None, enabled=enabled)


def stored_precision(module):
    """The precision in which a module stores its convolution weights (that of its first convolution)."""
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    return next(name for name, dtype in DTYPES.items() if conv.weight.dtype == dtype)


def precision_context(precision, module, device):
    """How a module computes in a precision: as it is when it stores its weights in that precision, under
    autocast when it stores them in float32; weights stored in another half precision are a ValueError."""
    check_precision(precision, device)
    stored = stored_precision(module)
    if stored == precision:
        return contextlib.nullcontext()
    if stored != "fp32":
        raise ValueError(f"the model stores its weights in {stored}: sample it with precision {stored!r}, "
                         f"not {precision!r}")
    return autocast(precision, device)


def store_weights(model, precision):
    """Store the UNet's weights in a precision once, so that sampling in it needs no per-call weight casts.

    Its normalization layers (GroupNorm, LayerNorm) keep float32 parameters and compute in float32; the class
    embedder, the VQ first stage (run once per image, under autocast) and the samplers' updates stay float32.
    """
    dtype = check_precision(precision, model.device)
    unet = model.unet
    for module in unet.modules():
        if not isinstance(module, NORMALIZATIONS):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    unet.dtype = dtype
    return model


def set_tf32(enabled):
    """Whether CUDA float32 matmuls and cuDNN convolutions may use TF32 (PyTorch's default: convolutions only)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def optimize_for_inference(model, channels_last=False, precision="fp32", attention="auto"):
    """Opt-in speed-ups: NHWC convolutions (fp32 results change only by float rounding), weights stored in
    a half precision (`store_weights`) and the attention backend (`set_attention`). torch.compile is
    `ldm.compile.compile_unet`."""
    set_attention(model, attention)
    if precision != "fp32":
        store_weights(model, precision)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
