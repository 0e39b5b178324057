"""Sample a class-conditional LDM with FasterDiffusion (or any solver and cache; with --compare, several) into one picture.

With no arguments it uses the published demo's settings for cin256-v2: classes 25 187 448 992 123 11, one
sample each, 250 DDIM steps, eta 0, guidance scale 6, FasterDiffusion with the `ldm250-fast` key steps; the
decoder context is 'paired' (each guidance branch with its own class) unless --context_layout reference.
On the CPU, without --steps, it takes CPU_STEPS steps instead (minutes, not hours) and says so.
Every class starts from the same initial noise x_T, so rows and columns are comparable.
The picture has one labelled row per sampling mode and one tile per sample (class-major); tiles are the
decoded images mapped to uint8 by ldm.sampling.to_uint8 (truncating, like the evaluated samples).
`--compare` adds rows before the flags' mode: plain DDIM, or the modes it lists (SAMPLER[+CACHE[:VALUE]], e.g.
ddim dpmpp2m+deepcache:3 plms+fd:uniform:4; the cache flags give their other options). The table printed
compares each row with the first: seconds per image, speed-up, UNet GFLOPs per image (counted with
torch.utils.flop_counter in one extra untimed image per row), encoder passes, decoder rows, shallow passes.
Before a row is timed, each kind of UNet call it makes runs once, untimed, at its batch size. With several rows,
each is sampled --repeats times (default 3), the rows in turn (A B C A B C ...); its time is the median of its
repeats, and one line under the table says how far the repeats spread, or that they are too noisy to rank the rows.
"""
import functools
import itertools
import os
import sys
import time

from ldm.startup import start_front_end

start_front_end(__name__)  # before torch loads: Ctrl-C meanwhile is one line; OpenMP threads wait passively

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ldm import cli  # noqa: E402
from ldm.compile import run_mode_calls  # noqa: E402
from ldm.distributed import share_cpu_threads  # noqa: E402
from ldm.models.diffusion.caches import CACHES  # noqa: E402
from ldm.models.diffusion.modes import split_spec  # noqa: E402
from ldm.sampling import generate, sample_latents, to_uint8  # noqa: E402
from ldm.timing import alternate, device_clock  # noqa: E402
from ldm.util import write_atomic  # noqa: E402

REPEATS_COMPARED = 3  # default --repeats with several rows (one row is sampled once)

PUBLISHED_CLASSES = (25, 187, 448, 992, 123, 11)
PUBLISHED_STEPS = 250
CPU_STEPS = 20
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}

# Picture layout: a label column of LABEL_WIDTH pixels on the left of each row, PAD pixels of
# background around every tile. Size: (LABEL_WIDTH + cols * (tile + PAD) + PAD) x (rows * (tile + PAD) + PAD).
LABEL_WIDTH = 112
MIN_TILE = 96  # smaller tiles are shown enlarged
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
    for flag, value in (("--n_per_class", args.n_per_class), ("--repeats", args.repeats)):
        if value is not None and value < 1:
            raise cli.UsageError(f"{flag} must be at least 1, not {value}")
    cli.apply_mode_flag(args)
    device = cli.check_device(args)
    if args.steps is None:
        args.steps = CPU_STEPS if device.type == "cpu" else PUBLISHED_STEPS
    cli.check_sampling(args)
    modes = sampling_modes(args)
    check_output_path(args.out)
    cli.check_files(args)
    model = cli.inspect_model(args)
    cli.check_classes(args.classes, model)
    for mode in modes:
        cli.check_mode_fits(mode, model, args.steps)
    if args.repeats is None:
        args.repeats = REPEATS_COMPARED if len(modes) > 1 else 1
    return device, modes


def sampling_modes(args):
    """The Mode of each row: the --compare modes (plain DDIM for a bare --compare), the flags' mode and, with
    --compare_reference, the flags' FasterDiffusion with the reference context layout; repeats dropped."""
    layouts = [c for c, cls in CACHES.items() if any(o.name == "context_layout" for o in cls.options)]
    if args.compare_reference and args.cache not in layouts:
        raise cli.UsageError(f"--compare_reference adds a row with the published fork's context layout: it needs "
                             f"--cache {' or '.join(layouts)}, not {args.cache}")
    names = args.compare or (["ddim"] if args.compare is not None or args.compare_reference else [])
    modes = [cli.make_mode(args, name) for name in names]
    rows = [split_spec(name)[:2] for name in names]
    modes.append(cli.make_mode(args, rows=rows))
    if args.compare_reference:
        modes.append(cli.make_mode(args, context_layout="reference"))
    return list({repr(mode): mode for mode in modes}.values())


def row_label(mode):
    """The label lines of a mode's row: its label (Mode.label), solver and cache on lines of their own."""
    return mode.label.split(" + ")


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

    def expected(steps):  # per row: a call per class and repeat, and the FLOP-counting image
        minutes = (per_step * steps + per_call) * (len(args.classes) * args.repeats + 1) * rows / 60
        return f"{minutes / 60:.1f} h" if minutes > 90 else f"{max(minutes, 0.1):.1f} min"

    line = f"on the CPU: expected time up to about {expected(args.steps)}"
    if steps_chosen:
        line += (f" with {args.steps} steps instead of the published {PUBLISHED_STEPS} "
                 f"(pass --steps {PUBLISHED_STEPS} for those: about {expected(PUBLISHED_STEPS)})")
    return line


def warm_up_calls(model, mode, batch_size, args):
    """Each kind of UNet call the mode makes at this batch size, once and untimed, so that a shape's first-call
    costs (cuDNN's autotuner on a GPU, oneDNN's set-up on the CPU) do not fall in the row's time: a cache meets
    more shapes than DDIM (FasterDiffusion a decoder call for every group size)."""
    run_mode_calls(model, [mode], args.steps, batch_size, args.scale != 1, args.precision)


def count_flops(model, x_T, mode, args):
    """UNet FLOPs per image of the mode at len(x_T) images, from one untimed image (which also warms the mode up);
    FasterDiffusion's decoder calls hold as many steps as at len(x_T) images (Mode.for_counting)."""
    mode = mode.for_counting(len(x_T), args.scale != 1)
    labels = torch.full((1,), args.classes[0], dtype=torch.long)
    _, intermediates = sample_latents(model, labels, args.steps, args.scale, x_T=x_T[:1],
                                      generators=torch.Generator().manual_seed(args.seed + 1),
                                      precision=args.precision, mode=mode, count_flops=True)
    return intermediates["stats"].flops


def sample_row(model, classes, x_T, mode, args, desc):
    """Sample every class from the same x_T; returns (uint8 tiles [N, H, W, 3], stats).

    The stats (passes, decoder rows) are those of one sampling call of len(x_T) images. Two progress bars: the
    classes of this row (labelled `desc: classes`) and, below it, the steps of the current class.
    """
    tiles, stats = [], None
    for c in tqdm(classes, desc=f"{desc}: classes", unit="class", disable=args.tqdm_disable):
        labels = torch.full((len(x_T),), c, dtype=torch.long)
        eta_noise = torch.Generator().manual_seed(args.seed + 1)  # DDIM noise when eta > 0, the same for every class
        images, intermediates = generate(model, labels, args.steps, args.scale, x_T=x_T, generators=eta_noise,
                                         precision=args.precision, progress=not args.tqdm_disable, mode=mode)
        tiles.append(to_uint8(images).cpu())  # the copy to the CPU waits for the device to finish
        stats = intermediates["stats"]
    return torch.cat(tiles).numpy(), stats


def row_names(modes):
    """A name for each row in the timings: its mode's label, numbered where two rows share one."""
    labels = [mode.label for mode in modes]
    return [label if labels.count(label) == 1 else f"{label} (row {i + 1})" for i, label in enumerate(labels)]


def time_rows(model, x_T, modes, args):
    """Sample each row --repeats times, the rows in turn (A B C A B C ...), timing each whole row; returns (Timings
    by row name, {row name: (tiles, stats)})."""
    def run(mode, repeat):
        desc = mode.label
        if args.repeats > 1:  # the progress bars say which repeat they count
            desc += f", run {next(repeat)} of {args.repeats}"
        return sample_row(model, args.classes, x_T, mode, args, desc)

    runs = {name: functools.partial(run, mode, itertools.count(1)) for name, mode in zip(row_names(modes), modes)}
    return alternate(runs, args.repeats, device_clock(model.device))


def render_grid(rows, labels):
    """One row of tiles per entry of rows (uint8 [N, H, W, 3], equal shapes), its label lines on the left.

    Rows are as high as their tiles, or as the tallest label where that is taller; the label column is
    LABEL_WIDTH wide, or as wide as the widest label line. Tiles under MIN_TILE pixels are enlarged by a
    whole factor (nearest neighbour), so that small models' samples can be seen.
    """
    zoom = max(1, MIN_TILE // rows[0].shape[1])
    rows = [tiles.repeat(zoom, axis=1).repeat(zoom, axis=2) for tiles in rows]
    n, height, width = rows[0].shape[:3]
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.multiline_textbbox((4, 2), "\n".join(lines), font=font, spacing=2) for lines in labels]
    label_width = max([LABEL_WIDTH] + [box[2] + 4 for box in boxes])
    row_height = max([height] + [box[3] + 2 for box in boxes])
    picture = Image.new("RGB", (label_width + n * (width + PAD) + PAD, len(rows) * (row_height + PAD) + PAD),
                        BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for r, (tiles, lines) in enumerate(zip(rows, labels)):
        top = PAD + r * (row_height + PAD)
        draw.multiline_text((4, top + 2), "\n".join(lines), fill=TEXT_COLOR, font=font, spacing=2)
        for k, tile in enumerate(tiles):
            picture.paste(Image.fromarray(tile), (label_width + PAD + k * (width + PAD), top))
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


def picture_labels(modes, results):
    """The label lines of each row in the picture: its mode's, its seconds per image and, after the first row, its
    speed-up against the first."""
    first, base = results[0][:2]
    against = "DDIM" if first == "DDIM" else "row 1"
    return [row_label(mode) + [f"{sec:.3f} s/img"] + ([f"{base / sec:.2f}x vs {against}"] if i else [])
            for i, (mode, (_, sec, *_)) in enumerate(zip(modes, results))]


def format_table(results, images_per_call):
    """A plain-text table: each mode's seconds per image (median of its repeats), how far its repeats spread, speed-up
    against the first row, GFLOPs per image, passes."""
    header = ["mode", "s/img", "spread", "speed-up", "GFLOP/img", "encoder passes", "decoder rows", "shallow passes"]
    base = results[0][1]
    rows = [[name, f"{sec:.3f}", "-" if spread is None else f"{spread:.0%}", f"{base / sec:.2f}x", f"{flops / 1e9:.4g}",
             str(stats.encoder_passes), str(stats.decoder_rows), str(stats.shallow_passes)]
            for name, sec, spread, flops, stats in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.append(f"(s/img: median of the row's repeats; spread: their (max - min) / median, - for one repeat; "
                 f"speed-up against the first row; passes and rows per sampling call of {images_per_call} image(s); "
                 "decoder rows count both guidance branches)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    share_cpu_threads()  # no more threads than the cores this process may use
    steps_chosen = args.steps is None
    try:
        device, modes = check_args(args)
        model = cli.load(args, device)
        modes = [cli.calibrate(mode, model, args) for mode in modes]  # auto:K steps calibrated on the model, once
        compiled = cli.compile_for(model, args, modes, args.n_per_class)
        if compiled:
            print(compiled, file=sys.stderr, flush=True)
        x_T = initial_noise(model, args.n_per_class, args.seed)
        timing = warm_up(model, x_T, args.precision)
        if device.type == "cpu":
            print(cpu_notice(args, steps_chosen, timing, len(modes)), file=sys.stderr, flush=True)
        flops = []
        for mode in modes:  # untimed: the FLOPs, and each kind of UNet call the row makes
            flops.append(count_flops(model, x_T, mode, args))
            warm_up_calls(model, mode, len(x_T), args)
        timings, sampled = time_rows(model, x_T, modes, args)
        images = len(args.classes) * len(x_T)
        results = [(mode.label, timings.median(name) / images, timings.spread(name) if args.repeats > 1 else None,
                    row_flops, sampled[name][1]) for name, mode, row_flops in zip(row_names(modes), modes, flops)]
        print(format_table(results, args.n_per_class))
        if len(modes) > 1:
            print(timings.verdict())
        tiles = [sampled[name][0] for name in row_names(modes)]
        save_picture(render_grid(tiles, picture_labels(modes, results)), args.out)
    except cli.UsageError as e:
        return cli.report(e)
    print(f"saved {args.out}")
    return 0


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_model_args(parser)
    cli.add_sampling_args(parser)
    cli.add_mode_args(parser)
    cli.add_device_args(parser)
    picture = parser.add_argument_group("picture")
    picture.add_argument("--classes", type=int, nargs="+", default=list(PUBLISHED_CLASSES),
                         help="class labels, 0..N-1 for a model of N classes")
    picture.add_argument("--n_per_class", type=int, default=1, help="samples per class (they share one x_T)")
    picture.add_argument("--compare", nargs="*", default=None, metavar="MODE",
                         help="rows before the flags' mode, from the same noise: plain DDIM, or these modes "
                              "(SAMPLER[+CACHE[:VALUE]], e.g. ddim dpmpp2m+deepcache:3 plms+fd:uniform:4)")
    picture.add_argument("--compare_reference", action="store_true",
                         help="also add a FasterDiffusion row with the reference context layout (implies --compare)")
    picture.add_argument("--out", default="outputs/samples.png", help="picture to write (.png, .jpg or .jpeg)")
    picture.add_argument("--repeats", type=int, default=None,
                         help=f"timed runs of each row, the rows in turn; the table gives their median (default "
                              f"{REPEATS_COMPARED} with several rows, 1 with one)")
    # The published demo's settings; steps: 250 on a GPU, CPU_STEPS on the CPU.
    parser.set_defaults(steps=None, scale=6.0, key_steps="ldm250-fast", cache="fd")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
