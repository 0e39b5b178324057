"""Class-conditional 32x32 RGB digits drawn with the TrueType fonts that ship with matplotlib.

Image i of a set is a function of (seed, i) alone: its class, font, size, rotation, position, stroke
and colours are drawn from its own random stream, so sets of any size, made in any order or by any
number of processes, agree image by image. Class = digit (0-9).
"""
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

NUM_CLASSES = 10
IMAGE_SIZE = 32
REFERENCE_SEED = 1_000_003  # the held-out reference batch; training sets must use another seed
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SUPERSAMPLE = 4  # draw at 4x and downsample, for smooth anti-aliased edges


@lru_cache(maxsize=1)
def digit_fonts():
    """The matplotlib fonts whose glyphs for '0'-'9' are the ten digits (not symbols or a placeholder)."""
    import matplotlib
    from fontTools.ttLib import TTFont

    fonts = []
    for path in sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf")):
        cmap = TTFont(path, lazy=True).getBestCmap()
        glyphs = [cmap.get(ord(str(d)), "") for d in range(10)]
        if all(g.lower().startswith(name) for g, name in zip(glyphs, DIGIT_NAMES)):
            fonts.append(str(path))
    if not fonts:
        raise RuntimeError("no matplotlib font with digit glyphs found")
    return tuple(fonts)


@lru_cache(maxsize=4096)
def _font(path, size):
    return ImageFont.truetype(path, size)


def _colour(rng):
    return rng.integers(0, 256, size=3)


def _luminance(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _contrasting_pair(rng, min_contrast=70.0):
    """A (foreground, background) pair of colours that differ enough in luminance to read the digit."""
    while True:
        fg, bg = _colour(rng), _colour(rng)
        if abs(_luminance(fg) - _luminance(bg)) >= min_contrast:
            return fg, bg


def _background(rng, bg, size):
    """A plain colour or a linear gradient from bg to a nearby colour, with a little pixel noise."""
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = bg
    if rng.random() < 0.5:
        other = np.clip(bg + rng.normal(0, 50, size=3), 0, 255)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        ramp = np.clip(0.5 + xx * np.cos(angle) + yy * np.sin(angle), 0, 1)[..., None]
        canvas = canvas * (1 - ramp) + other * ramp
    return canvas


def draw_digit(rng, fonts=None):
    """One random draw: returns (uint8 image [32, 32, 3], digit)."""
    fonts = fonts or digit_fonts()
    digit = int(rng.integers(NUM_CLASSES))
    font_path = fonts[rng.integers(len(fonts))]
    big = IMAGE_SIZE * _SUPERSAMPLE
    font = _font(font_path, int(big * rng.uniform(0.55, 0.95)))
    stroke = int(rng.integers(0, 7))  # up to 1.5 px at the final size
    fg, bg = _contrasting_pair(rng)

    mask = Image.new("L", (2 * big, 2 * big), 0)
    ImageDraw.Draw(mask).text((big, big), str(digit), font=font, fill=255, anchor="mm", stroke_width=stroke,
                              stroke_fill=255)
    mask = mask.rotate(rng.uniform(-25, 25), resample=Image.BICUBIC, center=(big, big))
    box = mask.getbbox() or (big, big, big + 1, big + 1)
    glyph = mask.crop(box)
    if max(glyph.size) > 0.95 * big:  # keep the whole digit inside the image
        glyph = glyph.resize([max(1, int(s * 0.95 * big / max(glyph.size))) for s in glyph.size], Image.BICUBIC)
    x = int(rng.integers(0, big - glyph.size[0] + 1))
    y = int(rng.integers(0, big - glyph.size[1] + 1))
    alpha = np.zeros((big, big), np.float32)
    alpha[y:y + glyph.size[1], x:x + glyph.size[0]] = np.asarray(glyph, np.float32) / 255

    canvas = _background(rng, bg, big)
    if rng.random() < 0.3:  # a two-tone digit: foreground blends to a second colour across the glyph
        fg2 = np.clip(fg + rng.normal(0, 60, size=3), 0, 255)
        t = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
        fg = fg * (1 - t) + fg2 * t
    canvas = canvas * (1 - alpha[..., None]) + fg * alpha[..., None]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0) * _SUPERSAMPLE / 2))
    image = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), np.float32)
    image = image + rng.normal(0, rng.uniform(0, 6), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), digit


def image_rng(seed, index):
    """The random stream of image `index` of the set made with `seed`."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def read_set(path):
    """Images and labels of an ADM-format .npz (arr_0: uint8 [N, H, W, 3], arr_1: digits 0-9); a file that is
    not one is an OSError or ValueError whose message starts with the path."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a .npz file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = np.load(path)
    except Exception:  # np.load fails in many ways on files that are not .npy or .npz
        raise ValueError(f"{path} is not a .npz file (arrays saved by numpy.savez)") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds one array, not a .npz with arr_0 (images) and arr_1 (labels)")
    with data:
        missing = [name for name in ("arr_0", "arr_1") if name not in data.files]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(missing)}: expected arr_0 (images) and arr_1 (labels)")
        images, labels = data["arr_0"], data["arr_1"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"{path}: arr_0 is {images.dtype} {list(images.shape)}, not uint8 RGB images [N, H, W, 3]")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or not np.isin(labels, range(NUM_CLASSES)).all():
        raise ValueError(f"{path}: arr_1 is not one digit 0-{NUM_CLASSES - 1} per image of arr_0")
    return images, labels


def make_digits(seed, indices):
    """Images and labels for the given indices of the set made with `seed`: (uint8 [N, 32, 32, 3], int64 [N])."""
    fonts = digit_fonts()
    draws = [draw_digit(image_rng(seed, i), fonts) for i in indices]
    images = np.stack([d[0] for d in draws]) if draws else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return images, np.array([d[1] for d in draws], dtype=np.int64)
