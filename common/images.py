"""A user's image of a digit, prepared the way MNIST's were: framework-free (numpy + Pillow).

MNIST's digits (LeCun et al.) are white on black, size-normalised so the longer side of
the ink fits 20 pixels (aspect kept, anti-aliased), then placed in a 28x28 field with
their centre of mass at the centre. `load_image` does the same to any PNG/JPEG (or other
format Pillow reads) of any size and mode, dark ink on light paper or light on dark.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.errors import UserError, first_line

MAX_PIXELS = 50_000_000  # refused before decoding: each pixel decodes to four bytes of RGBA
BOX = 20  # the longer side of the ink, as in MNIST
SIZE = 28
MAX_SIDE = 2048  # larger images are shrunk first (in Pillow, as uint8): the digit ends up 20 px anyway
MIN_CONTRAST = 32.0  # ink must differ from the paper by this much (of 255), else the image counts as blank
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what a folder is searched for


class ImageError(UserError):
    """One image that cannot be used: "PATH: reason". The reason alone goes into predict.py's
    JSON error records, beside the path."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def load_image(path: str | Path) -> np.ndarray:
    """The image at `path` as an MNIST-style uint8 (28, 28) array; every problem is a one-line ImageError."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "no such file")
    if not path.is_file():
        raise ImageError(path, "not a file")
    try:
        with warnings.catch_warnings():
            # Pillow warns (a second stderr line) above its own limit and raises at twice it;
            # the check below refuses far smaller images first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                check_size(image.size, path)
                image.seek(0)  # first frame of an animated GIF/PNG
                image.draft(image.mode, (MAX_SIDE, MAX_SIDE))  # JPEG: decode at 1/2, 1/4 or 1/8 scale if that suffices
                image.load()
                gray = to_gray(image)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(path, f"image is too large (more than {MAX_PIXELS // 1_000_000} megapixels)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow can read (expected PNG or JPEG)") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except Exception as e:  # noqa: BLE001 - a broken file can fail inside any decoder, in any way
        raise ImageError(path, f"cannot decode the image ({type(e).__name__}: {first_line(e)})") from None
    return prepare(gray, name=str(path))


def images_in(folder: str | Path) -> list[Path]:
    """The image files directly in `folder` (by their suffix), sorted by name; hidden ones skipped."""
    folder = Path(folder)
    try:
        files = sorted(p for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    except OSError as e:
        raise UserError(f"{folder}: cannot list the folder ({e.strerror})") from None
    if not files:
        raise UserError(f"{folder}: no image files in this folder ({', '.join(IMAGE_SUFFIXES)})")
    return files


def check_size(size: tuple[int, int], name: str | Path = "image") -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(name, f"image is too large ({width}x{height} = {width * height / 1e6:.0f} megapixels; "
                               f"the limit is {MAX_PIXELS // 1_000_000})")
    if width <= 0 or height <= 0:
        raise ImageError(name, f"image has no pixels ({width}x{height})")


def to_gray(image: Image.Image) -> np.ndarray:
    """Float gray levels 0..255, (h, w), from any mode; transparency is flattened onto a
    background that contrasts with the visible pixels (so dark strokes on a transparent
    canvas, or light ones, both stay visible)."""
    image = ImageOps.exif_transpose(image)  # phone photos are often stored sideways
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):  # 16/32-bit gray: stretch to 0..255
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    has_alpha = "A" in mode or "transparency" in image.info
    image = image.convert("RGBA" if has_alpha else "L")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)  # area average, aspect kept
    if not has_alpha:
        return np.asarray(image, dtype=np.float64)
    rgba = image
    gray = np.asarray(rgba.convert("L"), dtype=np.float64)
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64) / 255.0
    if alpha.sum() == 0:
        return np.zeros_like(gray)  # fully transparent: blank
    visible = (gray * alpha).sum() / alpha.sum()
    background = 255.0 if visible < 128 else 0.0
    return gray * alpha + background * (1 - alpha)


def prepare(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """Gray levels (h, w) in 0..255, either polarity -> MNIST-style uint8 (28, 28)."""
    a = np.asarray(gray, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ImageError(name, f"expected a 2-D gray image, got shape {a.shape}")
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    if np.median(border) > 127.5:  # light paper: make the ink the bright part, as in MNIST
        a = 255.0 - a
        border = 255.0 - border
    paper = float(np.median(border))
    a = np.clip(a - paper, 0.0, None)
    if a.max() < MIN_CONTRAST:
        raise ImageError(name, "no digit found (the image is blank: one colour, or nearly)")
    # Paper noise (JPEG artefacts, grain) stays below what the border's brightest pixels reach.
    # Capped, so a digit that runs into the border cannot pass for paper.
    noise = min(float(np.percentile(np.clip(border - paper, 0.0, None), 99)), 0.25 * float(a.max()))
    a[a <= noise] = 0.0
    rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
    a = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return center(fit_box(a))


def fit_box(a: np.ndarray, box: int = BOX) -> np.ndarray:
    """Scales the ink so its longer side is `box` pixels, keeping the aspect ratio; the
    brightest stroke becomes 255 (thin pen lines on a big canvas would otherwise fade)."""
    h, w = a.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS))
    resized = np.clip(resized, 0.0, None)  # Lanczos rings slightly below zero next to strokes
    return resized * (255.0 / resized.max()) if resized.max() > 0 else resized


def center_of_mass(a: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(a.shape)
    total = a.sum()
    return float((a * ys).sum() / total), float((a * xs).sum() / total)


def center(a: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Pastes `a` into a black size x size field so its centre of mass lands on pixel (14, 14),
    where MNIST's lie (mean over the test set: 13.99, 14.00), kept inside the field."""
    h, w = a.shape
    cy, cx = center_of_mass(a)
    top = int(np.clip(round(size / 2 - cy), 0, size - h))
    left = int(np.clip(round(size / 2 - cx), 0, size - w))
    out = np.zeros((size, size), dtype=np.float64)
    out[top : top + h, left : left + w] = a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
