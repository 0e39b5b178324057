"""Sample the class-conditional ImageNet-256 LDM with FasterDiffusion (and, with --compare, plain DDIM).

With no arguments it uses the published demo's settings: classes 25 187 448 992 123 11, one sample each,
250 DDIM steps, eta 0, guidance scale 6, seed 1, FasterDiffusion with the `ldm250-fast` key steps; the
decoder context is 'paired' (each guidance branch with its own class) unless --context_layout reference.
Every class starts from the same initial noise x_T, so rows and columns are comparable.
The picture has one labelled row per sampling mode and one tile per sample (class-major); tiles are the
decoded images mapped to uint8 by ldm.sampling.to_uint8 (truncating, like the evaluated samples).
"""
import argparse
import os
import sys
import time

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import make_ddim_timesteps
from ldm.models.diffusion.faster_diffusion import CONTEXT_LAYOUTS, FasterDiffusion
from ldm.sampling import NUM_CLASSES, generate, to_uint8
from ldm.util import PRECISIONS, autocast, load_model, optimize_for_inference, write_atomic

DEFAULT_CONFIG = "configs/latent-diffusion/cin256-v2.yaml"
DEFAULT_CKPT = "models/ldm/cin256-v2/model.ckpt"
PUBLISHED_CLASSES = (25, 187, 448, 992, 123, 11)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}

# Picture layout: a label column of LABEL_WIDTH pixels on the left of each row, PAD pixels of
# background around every tile. Size: (LABEL_WIDTH + cols * (tile + PAD) + PAD) x (rows * (tile + PAD) + PAD).
LABEL_WIDTH = 112
PAD = 2
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


class UsageError(Exception):
    """Bad input, reported as a single `error: ...` line."""


def check_output_path(path):
    """Fail early when the picture cannot be written: bad extension, or a folder that cannot be made."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise UsageError(f"--out {path}: unsupported picture type {ext or '(none)'!r}; use .png, .jpg or .jpeg")
    if os.path.isdir(path):
        raise UsageError(f"--out {path} is a directory; give a file name ending in .png or .jpg")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--out {path}: cannot create directory {folder} ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: directory {existing} is not writable")


def check_args(args):
    """Validate everything that can be checked without the model; return the sampling modes."""
    unknown = [c for c in args.classes if not 0 <= c < NUM_CLASSES]
    if unknown:
        raise UsageError(f"unknown class id {unknown[0]}: ImageNet class ids are 0..{NUM_CLASSES - 1}")
    if args.n_per_class < 1:
        raise UsageError(f"--n_per_class must be at least 1, not {args.n_per_class}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, not {args.eta}")
    try:
        make_ddim_timesteps(args.steps)
        modes = sampling_modes(args)
        for _, fd in modes:
            if fd is not None:
                fd.groups(args.steps)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a torch device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here; use --device cpu")
    try:
        autocast(args.precision, device)
    except ValueError as e:
        raise UsageError(f"--precision {args.precision}: {e}") from None
    check_output_path(args.out)
    if not os.path.isfile(args.config):
        raise UsageError(f"config not found: {args.config}")
    if not os.path.isfile(args.ckpt):
        fetch = "python scripts/download_model.py" + ("" if args.ckpt == DEFAULT_CKPT else f" --out {args.ckpt}")
        raise UsageError(f"checkpoint not found: {args.ckpt}; download it with `{fetch}`")
    return modes


def sampling_modes(args):
    """(row label lines, FasterDiffusion plan or None for plain DDIM) for each row of the picture."""
    def plan(layout):
        return FasterDiffusion(args.key_steps, context_layout=layout, max_decoder_batch=args.max_decoder_batch)

    modes = []
    if args.compare or args.compare_reference:
        modes.append((["DDIM"], None))
    modes.append((["FasterDiffusion", f"{args.context_layout} context"], plan(args.context_layout)))
    if args.compare_reference:
        modes.append((["FasterDiffusion", "reference context"], plan("reference")))
    return modes


def load(args):
    """The model on args.device; a config or checkpoint that cannot be loaded is a UsageError."""
    try:
        model = load_model(args.config, args.ckpt, device=args.device, allow_pickle=args.allow_pickle)
        return optimize_for_inference(model, channels_last=args.channels_last, compile=args.compile)
    except (OSError, ValueError, KeyError, ImportError, AttributeError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot load the model: {reason}") from None


def initial_noise(model, n, seed):
    """One x_T of shape [n, C, H, W], drawn on the CPU from a generator seeded with seed."""
    shape = (n, model.channels, model.image_size, model.image_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(model.device)


def warm_up(model, x_T, precision):
    """One single-step sampling call, so that one-time start-up costs do not count in the first row's time."""
    labels = torch.zeros(len(x_T), dtype=torch.long)
    generate(model, labels, 1, 2.0, x_T=x_T, precision=precision)


def sample_row(model, classes, x_T, faster_diffusion, steps, scale, eta, seed, precision, desc):
    """Sample every class from the same x_T; returns (uint8 tiles [N, H, W, 3], seconds per image, stats).

    The stats (encoder passes, decoder rows) are those of one sampling call of len(x_T) images.
    """
    tiles, seconds, stats = [], 0.0, None
    for c in tqdm(classes, desc=desc, unit="class"):
        labels = torch.full((len(x_T),), c, dtype=torch.long)
        eta_noise = torch.Generator().manual_seed(seed + 1)  # DDIM noise when eta > 0, the same for every class
        start = time.perf_counter()
        images, intermediates = generate(model, labels, steps, scale, eta=eta, faster_diffusion=faster_diffusion,
                                         x_T=x_T, generators=eta_noise, precision=precision, progress=True)
        tiles.append(to_uint8(images).cpu())  # the copy to the CPU waits for the device to finish
        seconds += time.perf_counter() - start
        stats = intermediates["stats"]
    return torch.cat(tiles).numpy(), seconds / (len(classes) * len(x_T)), stats


def render_grid(rows, labels):
    """One row of tiles per entry of rows (uint8 [N, H, W, 3], equal shapes), its label lines on the left."""
    n, height, width = rows[0].shape[:3]
    picture = Image.new("RGB", (LABEL_WIDTH + n * (width + PAD) + PAD, len(rows) * (height + PAD) + PAD),
                        BACKGROUND)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for r, (tiles, lines) in enumerate(zip(rows, labels)):
        top = PAD + r * (height + PAD)
        draw.multiline_text((4, top + 2), "\n".join(lines), fill=TEXT_COLOR, font=font, spacing=2)
        for k, tile in enumerate(tiles):
            picture.paste(Image.fromarray(tile), (LABEL_WIDTH + PAD + k * (width + PAD), top))
    return picture


def save_picture(picture, path):
    """Write the picture under a temporary name in its folder, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fmt = IMAGE_FORMATS[os.path.splitext(path)[1].lower()]
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create directory {folder}: {e.strerror or e}") from None
    try:
        write_atomic(path, lambda f: picture.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def format_table(results, images_per_call):
    """A plain-text table: mode, seconds per image, speed-up against DDIM, encoder passes, decoder rows."""
    baseline = next((sec for name, sec, _ in results if name == "DDIM"), None)
    width = max(len(name) for name, _, _ in results)
    lines = [f"{'mode':<{width}}  {'s/img':>8}  {'speed-up':>8}  {'encoder passes':>14}  {'decoder rows':>12}"]
    for name, sec, stats in results:
        speedup = f"{baseline / sec:.2f}x" if baseline is not None else "-"
        lines.append(f"{name:<{width}}  {sec:>8.3f}  {speedup:>8}  {stats.encoder_passes:>14}  "
                     f"{stats.decoder_rows:>12}")
    lines.append(f"(passes and rows per sampling call of {images_per_call} image(s); "
                 "decoder rows count both guidance branches)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        modes = check_args(args)
        model = load(args)
        x_T = initial_noise(model, args.n_per_class, args.seed)
        warm_up(model, x_T, args.precision)
        rows, labels, results = [], [], []
        for lines, fd in modes:
            tiles, sec, stats = sample_row(model, args.classes, x_T, fd, args.steps, args.scale, args.eta,
                                           args.seed, args.precision, desc=" ".join(lines))
            rows.append(tiles)
            results.append((" ".join(lines), sec, stats))
        baseline = results[0][1] if modes[0][1] is None else None
        for (lines, fd), (_, sec, _) in zip(modes, results):
            speedup = [f"{baseline / sec:.2f}x vs DDIM"] if baseline is not None and fd is not None else []
            labels.append(lines + [f"{sec:.3f} s/img"] + speedup)
        print(format_table(results, args.n_per_class))
        save_picture(render_grid(rows, labels), args.out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"saved {args.out}")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a single `error: ...` line."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    p = _OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="model config (upstream LDM yaml)")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint (.ckpt or .safetensors)")
    p.add_argument("--classes", type=int, nargs="+", default=list(PUBLISHED_CLASSES), help="ImageNet class ids")
    p.add_argument("--n_per_class", type=int, default=1, help="samples per class (they share one x_T)")
    p.add_argument("--steps", type=int, default=250, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--scale", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=1, help="seed of the initial noise")
    p.add_argument("--key_steps", default="ldm250-fast",
                   help="FasterDiffusion key steps: ldm250-fast, ldm250, uniform:N or a list like 0,1,2,5,10")
    p.add_argument("--context_layout", choices=CONTEXT_LAYOUTS, default="paired",
                   help="class context of the parallel decoder rows ('reference' = the published fork)")
    p.add_argument("--compare", action="store_true", help="add a plain DDIM row from the same noise")
    p.add_argument("--compare_reference", action="store_true",
                   help="also add a FasterDiffusion row with the reference context layout (implies --compare)")
    p.add_argument("--out", default="outputs/samples.png", help="picture to write (.png, .jpg or .jpeg)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32, bf16, or fp16 (GPU only)")
    p.add_argument("--channels_last", action="store_true", help="NHWC convolutions (often faster)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU; slow first call)")
    p.add_argument("--max_decoder_batch", type=int, default=None,
                   help="at most this many rows per FasterDiffusion decoder call (bounds memory)")
    p.add_argument("--allow_pickle", action="store_true",
                   help="allow a checkpoint holding pickled Python objects (only for files you trust)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
