"""One image: decoded whole with Pillow, checked against the suite's image rules, converted to the model's uint8
(C, H, W). Pure functions (no I/O beyond the bytes given), shared by validation, preprocessing, the package and
batch inference, so training and serving decode and resize the same way."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

CHANNELS = {
    "1": 1,
    "L": 1,
    "I": 1,
    "I;16": 1,
    "F": 1,
    "LA": 2,
    "P": 3,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
    "RGBA": 4,
    "CMYK": 4,
}
# the checks of one image, as the validation report names them (the label's check is the table suite's)
EXPECTATIONS = {
    "decode": "expect_image_to_decode",
    "format": "expect_image_format_to_be_in_set",
    "size": "expect_image_size_to_be_between",
    "channels": "expect_image_channels_to_be_in_set",
    "label": "expect_column_values_to_be_in_set",
}


def open_image(data) -> Image.Image:
    """The image decoded whole (a truncated file fails here, not later); ValueError says why it cannot be."""
    if data is None or not len(data):
        raise ValueError("no image bytes (empty)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can decode") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"cannot be decoded ({str(e).splitlines()[0][:120]})") from None
    return im


def channels_of(im: Image.Image) -> int:
    return CHANNELS.get(im.mode, len(im.getbands()))


def problems(im: Image.Image, rules: dict) -> list[tuple[str, str]]:
    """(check, what is wrong) for each image rule of the suite the image breaks."""
    found = []
    formats = rules.get("formats")
    if formats and im.format not in formats:
        found.append(("format", f"format {im.format}, not one of {formats}"))
    for name, value in (("width", im.width), ("height", im.height)):
        bound = rules.get(name) or {}
        if value < bound.get("min", 0) or value > bound.get("max", value):
            found.append(("size", f"{name} {value}, not between {bound.get('min', 0)} and {bound.get('max', '∞')}"))
    allowed = rules.get("channels")
    if allowed and channels_of(im) not in allowed:
        found.append(("channels", f"{channels_of(im)} channels ({im.mode}), not one of {allowed}"))
    return found


def to_array(im: Image.Image, size: list[int], channels: int) -> np.ndarray:
    """The image as the model sees it: converted to greyscale or RGB, resized (bilinear) to size = [height, width],
    as uint8 (channels, height, width)."""
    mode = "L" if channels == 1 else "RGB"
    if im.mode in ("I", "I;16", "F"):  # 16/32-bit greyscale: scaled to 8 bits rather than clipped
        a = np.asarray(im, dtype=np.float64)
        top = float(a.max()) or 1.0
        im = Image.fromarray(np.clip(a * (255.0 / max(top, 255.0)), 0, 255).astype(np.uint8), "L")
    if im.mode != mode:
        im = im.convert(mode)
    height, width = size
    if im.size != (width, height):
        im = im.resize((width, height), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def decode_all(blobs, size: list[int], channels: int, rules: dict | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Images (encoded bytes) -> uint8 (n_good, C, H, W) of those that decode (and pass `rules`), and
    {position: reason} of those that do not."""
    height, width = size
    out = np.empty((len(blobs), channels, height, width), dtype=np.uint8)
    reasons: dict[int, str] = {}
    kept = 0
    for i, data in enumerate(blobs):
        try:
            im = open_image(data)
        except ValueError as e:
            reasons[i] = f"{EXPECTATIONS['decode']}: {e}"
            continue
        wrong = problems(im, rules or {})
        if wrong:
            reasons[i] = "; ".join(f"{EXPECTATIONS[c]}: {what}" for c, what in wrong)
            continue
        out[kept] = to_array(im, size, channels)
        kept += 1
    return out[:kept], reasons


def encode_png(pixels: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, 3) array as PNG bytes (lossless; fast compression)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
