"""Sample a class-conditional LDM with FasterDiffusion (and, with --compare, plain DDIM) into one picture.

With no arguments it uses the published demo's settings for cin256-v2: classes 25 187 448 992 123 11, one
sample each, 250 DDIM steps, eta 0, guidance scale 6, FasterDiffusion with the `ldm250-fast` key steps; the
decoder context is 'paired' (each guidance branch with its own class) unless --context_layout reference.
On the CPU, without --steps, it takes CPU_STEPS steps instead (minutes, not hours) and says so.
Every class starts from the same initial noise x_T, so rows and columns are comparable.
The picture has one labelled row per sampling mode and one tile per sample (class-major); tiles are the
decoded images mapped to uint8 by ldm.sampling.to_uint8 (truncating, like the evaluated samples).
"""
import os
import sys
import time

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ldm import cli
from ldm.sampling import generate, to_uint8
from ldm.util import write_atomic

PUBLISHED_CLASSES = (25, 187, 448, 992, 123, 11)
PUBLISHED_STEPS = 250
CPU_STEPS = 20
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}

# Picture layout: a label column of LABEL_WIDTH pixels on the left of each row, PAD pixels of
# background around every tile. Size: (LABEL_WIDTH + cols * (tile + PAD) + PAD) x (rows * (tile + PAD) + PAD).
LABEL_WIDTH = 112
PAD = 2
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


def check_output_path(path):
    """Fail early when the picture cannot be written: bad extension, or a folder that cannot be made."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise cli.UsageError(f"--out {path}: unsupported picture type {ext or '(none)'!r}; use .png, .jpg or .jpeg")
    if os.path.isdir(path):
        raise cli.UsageError(f"--out {path} is a directory; give a file name ending in .png or .jpg")
    cli.check_writable_folder(os.path.dirname(os.path.abspath(path)), "--out")


def check_args(args):
    """Validate everything that can be checked without the weights; returns (device, sampling modes).

    Without --steps, args.steps becomes the published 250 on a GPU and CPU_STEPS on the CPU.
    """
    if args.n_per_class < 1:
        raise cli.UsageError(f"--n_per_class must be at least 1, not {args.n_per_class}")
    device = cli.check_device(args)
    if args.steps is None:
        args.steps = CPU_STEPS if device.type == "cpu" else PUBLISHED_STEPS
    cli.check_sampling(args)
    modes = sampling_modes(args)
    check_output_path(args.out)
    cli.check_files(args)
    cli.check_classes(args.classes, cli.inspect_model(args))
    return device, modes


def sampling_modes(args):
    """(row label lines, FasterDiffusion plan or None for plain DDIM) for each row of the picture."""
    modes = []
    if args.compare or args.compare_reference or not args.faster_diffusion:
        modes.append((["DDIM"], None))
    if args.faster_diffusion:
        modes.append((["FasterDiffusion", f"{args.context_layout} context"], cli.make_plan(args)))
        if args.compare_reference:
            modes.append((["FasterDiffusion", "reference context"], cli.make_plan(args, "reference")))
    return modes


def initial_noise(model, n, seed):
    """One x_T of shape [n, C, H, W], drawn on the CPU from a generator seeded with seed."""
    shape = (n, model.channels, model.image_size, model.image_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(model.device)


def warm_up(model, x_T, precision):
    """Sampling calls of one and two steps: one-time start-up costs then do not count in the first row's time.

    Returns the measured seconds per guided DDIM step and per call besides its steps (mostly decoding).
    """
    labels = torch.zeros(len(x_T), dtype=torch.long)
    generate(model, labels, 1, 2.0, x_T=x_T, precision=precision)
    seconds = []
    for steps in (1, 2):
        start = time.perf_counter()
        to_uint8(generate(model, labels, steps, 2.0, x_T=x_T, precision=precision)[0]).cpu()
        seconds.append(time.perf_counter() - start)
    per_step = max(seconds[1] - seconds[0], 0.0)
    return per_step, max(seconds[0] - per_step, 0.0)


def cpu_notice(args, steps_chosen, timing, rows):
    """One line for a CPU run: the expected time, and how to get the published step count if it was lowered."""
    per_step, per_call = timing

    def expected(steps):
        minutes = (per_step * steps + per_call) * len(args.classes) * rows / 60
        return f"{minutes / 60:.1f} h" if minutes > 90 else f"{max(minutes, 0.1):.1f} min"

    line = f"on the CPU: expected time up to about {expected(args.steps)}"
    if steps_chosen:
        line += (f" with {args.steps} steps instead of the published {PUBLISHED_STEPS} "
                 f"(pass --steps {PUBLISHED_STEPS} for those: about {expected(PUBLISHED_STEPS)})")
    return line


def sample_row(model, classes, x_T, faster_diffusion, args, desc):
    """Sample every class from the same x_T; returns (uint8 tiles [N, H, W, 3], seconds per image, stats).

    The stats (encoder passes, decoder rows) are those of one sampling call of len(x_T) images. Two progress
    bars: the classes of this row (labelled `desc: classes`) and, below it, the steps of the current class.
    """
    tiles, seconds, stats = [], 0.0, None
    for c in tqdm(classes, desc=f"{desc}: classes", unit="class", disable=args.tqdm_disable):
        labels = torch.full((len(x_T),), c, dtype=torch.long)
        eta_noise = torch.Generator().manual_seed(args.seed + 1)  # DDIM noise when eta > 0, the same for every class
        start = time.perf_counter()
        images, intermediates = generate(model, labels, args.steps, args.scale, eta=args.eta,
                                         faster_diffusion=faster_diffusion, x_T=x_T, generators=eta_noise,
                                         precision=args.precision, progress=not args.tqdm_disable)
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
        raise cli.UsageError(f"cannot create directory {folder}: {e.strerror or e}") from None
    try:
        write_atomic(path, lambda f: picture.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    except OSError as e:
        raise cli.UsageError(f"cannot write {path}: {e.strerror or e}") from None


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
    steps_chosen = args.steps is None
    try:
        device, modes = check_args(args)
        model = cli.load(args, device)
        x_T = initial_noise(model, args.n_per_class, args.seed)
        timing = warm_up(model, x_T, args.precision)
        if device.type == "cpu":
            print(cpu_notice(args, steps_chosen, timing, len(modes)), file=sys.stderr, flush=True)
        rows, labels, results = [], [], []
        for lines, fd in modes:
            tiles, sec, stats = sample_row(model, args.classes, x_T, fd, args, desc=" ".join(lines))
            rows.append(tiles)
            results.append((" ".join(lines), sec, stats))
        baseline = results[0][1] if modes[0][1] is None else None
        for (lines, fd), (_, sec, _) in zip(modes, results):
            speedup = [f"{baseline / sec:.2f}x vs DDIM"] if baseline is not None and fd is not None else []
            labels.append(lines + [f"{sec:.3f} s/img"] + speedup)
        print(format_table(results, args.n_per_class))
        save_picture(render_grid(rows, labels), args.out)
    except cli.UsageError as e:
        return cli.report(e)
    print(f"saved {args.out}")
    return 0


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.splitlines()[0])
    cli.add_model_args(parser)
    cli.add_sampling_args(parser)
    cli.add_faster_diffusion_args(parser)
    cli.add_device_args(parser)
    picture = parser.add_argument_group("picture")
    picture.add_argument("--classes", type=int, nargs="+", default=list(PUBLISHED_CLASSES),
                         help="class labels, 0..N-1 for a model of N classes")
    picture.add_argument("--n_per_class", type=int, default=1, help="samples per class (they share one x_T)")
    picture.add_argument("--compare", action="store_true", help="add a plain DDIM row from the same noise")
    picture.add_argument("--compare_reference", action="store_true",
                         help="also add a FasterDiffusion row with the reference context layout (implies --compare)")
    picture.add_argument("--out", default="outputs/samples.png", help="picture to write (.png, .jpg or .jpeg)")
    # The published demo's settings; steps: 250 on a GPU, CPU_STEPS on the CPU.
    parser.set_defaults(steps=None, scale=6.0, key_steps="ldm250-fast", faster_diffusion=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
