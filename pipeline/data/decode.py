"""Decode any image file OpenCV can read into 3-channel uint8 RGB, or say why not.

Line cameras deliver 8/12/16-bit mono, BGR, BGRA, sometimes float TIFFs; the model wants
one thing. Everything is normalised here so neither training nor the daemon has to care.
A pixel limit guards against decompression bombs before OpenCV allocates the full image.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from pipeline.preprocess import PreprocessSpec, decode_scale

# OpenCV reads this limit once at import; set it before cv2 loads so huge headers are refused
# by the decoder itself instead of allocating gigabytes. Our own check below uses the caller's limit.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))
import cv2  # noqa: E402

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm",
     ".jp2", ".exr", ".hdr", ".pfm", ".sr", ".ras", ".gif"}
)
DEFAULT_MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """An input that is not a usable image; ``kind`` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


_BLOCK_SAMPLES = 1 << 20  # float conversion works on row blocks of about this many samples


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:  # no full-size uint16 temporary: shifted straight into the uint8 output
        out = np.empty(img.shape, np.uint8)
        np.right_shift(img, 8, out=out, casting="unsafe")
        return out
    if img.dtype == np.int8:
        return (img.astype(np.int16) + 128).astype(np.uint8)
    if img.dtype == np.int16:
        return ((img.astype(np.int32) + 32768) >> 8).astype(np.uint8)
    return _float_to_uint8(img)


def _float_to_uint8(img: np.ndarray) -> np.ndarray:
    """Float (or 32-bit int) pixels -> uint8: [0, 1] scaled, [0, 255] kept, anything wider stretched.

    Works on row blocks: the float64 temporaries of a whole image would be 8-32 bytes per sample, so a
    compressed float TIFF/HDR at the pixel limit would need gigabytes for a few hundred MB of pixels.
    Non-finite pixels count as 0.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # signalling NaNs raise "invalid" when widened
        return _float_blocks_to_uint8(img)


def _float_blocks_to_uint8(img: np.ndarray) -> np.ndarray:
    rows = max(1, _BLOCK_SAMPLES // max(1, img[0].size))
    blocks = [img[r:r + rows] for r in range(0, img.shape[0], rows)]
    lo, hi, any_finite, all_finite = np.inf, -np.inf, False, True
    for blk in blocks:
        f = blk.astype(np.float64)
        finite = np.isfinite(f)
        if finite.any():
            any_finite = True
            lo, hi = min(lo, float(f[finite].min())), max(hi, float(f[finite].max()))
        all_finite = all_finite and bool(finite.all())
    if not any_finite:
        raise ImageDecodeError("invalid_pixels", "image has no finite pixel values")
    if not all_finite:  # non-finite pixels become 0 and take part in the range
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    offset, scale = 0.0, 1.0
    if 0.0 <= lo and hi <= 1.0:
        scale = 255.0
    elif hi > 255.0 or lo < 0.0:
        offset = lo
        # hi/2 - lo/2 cannot overflow where hi - lo can (float64 images spanning +-1e308)
        scale = 127.5 / max(hi / 2 - lo / 2, 1e-12)
    out = np.empty(img.shape, np.uint8)
    row = 0
    for blk in blocks:
        f = blk.astype(np.float64)
        f[~np.isfinite(f)] = 0.0
        f = f * scale - offset * scale + 0.5
        np.clip(f, 0, 255, out=f)
        out[row:row + len(blk)] = f.astype(np.uint8)
        row += len(blk)
    return out


def to_rgb_uint8(img: np.ndarray, keep_grey: bool = False) -> np.ndarray:
    """Any OpenCV-decoded array (BGR order, any depth/channels) -> HxWx3 uint8 RGB.

    ``keep_grey``: a single-channel image (or grey + alpha) stays HxW uint8, for callers that resize
    first and make the three identical channels afterwards (``resize_image`` accepts it): the same
    pixels for a third of the resize work, as with the monochrome cameras most lines use.
    """
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageDecodeError("bad_shape", f"unsupported image shape {img.shape}")
    img = _to_uint8(img)
    c = img.shape[2]
    if c in (1, 2):  # grey, grey + alpha
        grey = np.ascontiguousarray(img[:, :, 0])
        return grey if keep_grey else cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    if c == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if c == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return np.ascontiguousarray(img[:, :, 2::-1][:, :, :3])


def _u16(b: bytes, i: int, big: bool) -> int:
    return int.from_bytes(b[i:i + 2], "big" if big else "little")


def _u32(b: bytes, i: int, big: bool) -> int:
    return int.from_bytes(b[i:i + 4], "big" if big else "little")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        if m in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        seg = _u16(data, i + 2, True)
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC) and i + 9 <= n:
            return _u16(data, i + 7, True), _u16(data, i + 5, True)
        i += 2 + seg
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    big = data[:2] == b"MM"
    ifd = _u32(data, 4, big)
    if ifd + 2 > len(data):
        return None
    dims: dict[int, int] = {}
    for k in range(min(_u16(data, ifd, big), 512)):
        e = ifd + 2 + 12 * k
        if e + 12 > len(data):
            break
        tag, typ = _u16(data, e, big), _u16(data, e + 2, big)
        if tag in (256, 257):
            dims[tag] = _u16(data, e + 8, big) if typ == 3 else _u32(data, e + 8, big)
    return (dims[256], dims[257]) if len(dims) == 2 else None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    head = re.sub(rb"#[^\n]*", b" ", data[2:512])
    nums = re.match(rb"\s+(\d+)\s+(\d+)", head)
    return (int(nums.group(1)), int(nums.group(2))) if nums else None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of common formats, without decoding; None when unknown.

    Lets the pixel limit refuse a decompression bomb before OpenCV allocates it: OpenCV's own
    limit is read once when cv2 loads, so it only holds if this module was imported first.
    """
    if len(data) < 26:
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return _u32(data, 16, True), _u32(data, 20, True)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _u16(data, 6, False), _u16(data, 8, False)
    if data[:2] == b"BM":
        if _u32(data, 14, False) == 12:
            return _u16(data, 18, False), _u16(data, 20, False)
        w, h = (int.from_bytes(data[i:i + 4], "little", signed=True) for i in (18, 22))
        return abs(w), abs(h)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        fourcc = data[12:16]
        if fourcc == b"VP8X":
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        if fourcc == b"VP8 ":
            return _u16(data, 26, False) & 0x3FFF, _u16(data, 28, False) & 0x3FFF
        if fourcc == b"VP8L":
            bits = _u32(data, 21, False)
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        return None
    if data[:1] == b"P" and data[1:2] in b"123456fF":
        return _pnm_size(data)
    return None


def _png_chunk_problem(data: bytes) -> str | None:
    """Why the PNG's chunk lengths cannot be right, or None when every chunk fits in the file.

    OpenCV's PNG reader allocates what a chunk header declares before reading it: a 200-byte file
    claiming a 2 GB IDAT costs 2-4 GB of memory and seconds of CPU (a memory bomb the pixel limit
    does not see). A chunk longer than the rest of the file is corrupt or truncated either way.
    """
    i, n = 8, len(data)
    while i + 8 <= n:
        length, ctype = _u32(data, i, True), data[i + 4:i + 8]
        if length > 0x7FFFFFFF or i + 12 + length > n:
            name = ctype.decode("latin-1") if ctype.isalpha() else ctype.hex()
            return (f"corrupt PNG: chunk {name} at byte {i} declares {length} bytes, "
                    f"only {max(n - i - 12, 0)} follow")
        if ctype == b"IEND":
            return None
        i += 12 + length
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the file header without decoding, or None for unknown formats."""
    return _header_size(data if isinstance(data, bytes) else bytes(data))


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _truncation_hint(data: bytes) -> str:
    """Why a PNG/JPEG that failed to decode looks cut short (a file still being written, say)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        return "; looks truncated: PNG has no IEND chunk (file still being written?)"
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return "; looks truncated: JPEG has no end-of-image marker (file still being written?)"
    return ""


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, spec: PreprocessSpec | None = None,
                 keep_grey: bool = False) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB. Raises ImageDecodeError with a reason.

    ``spec``: the model input the image is decoded for. When it allows (``jpeg_scaled_decode``), a
    large 8-bit JPEG is decoded directly at a reduced scale (``decode_scale``); everything that feeds
    a model passes its spec, so training and serving decode alike. ``keep_grey``: see ``to_rgb_uint8``.
    """
    if not data:
        raise ImageDecodeError("empty", "empty file")
    data = bytes(data)
    size = _header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageDecodeError("too_large", f"image header says {size[0]}x{size[1]} = {size[0] * size[1]} pixels, "
                                            f"limit is {max_pixels}")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and (problem := _png_chunk_problem(data)):
        raise ImageDecodeError("undecodable", problem + _truncation_hint(data))
    buf = np.frombuffer(data, dtype=np.uint8)
    # Orientation is ignored on both paths: line cameras do not rotate, and EXIF must not change pixels.
    flags = cv2.IMREAD_UNCHANGED
    if spec is not None and size is not None and data[:2] == b"\xff\xd8":
        r = decode_scale(size[0], size[1], spec)
        if r > 1:
            flags = _REDUCED[r] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as exc:  # OpenCV raises for oversize headers and some corrupt streams
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        kind = "too_large" if "pixels" in msg.lower() or "size" in msg.lower() else "undecodable"
        raise ImageDecodeError(kind, f"cannot decode image: {msg}") from None
    if img is None:
        raise ImageDecodeError("undecodable", "not an image OpenCV can decode (corrupt, truncated or unknown format)"
                               + _truncation_hint(data))
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ImageDecodeError("too_large", f"image has {img.shape[0] * img.shape[1]} pixels, limit is {max_pixels}")
    return to_rgb_uint8(img, keep_grey)


def decode_file(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = 256 * 1024 * 1024, spec: PreprocessSpec | None = None) -> np.ndarray:
    """Read and decode a file (symlinks followed). Raises ImageDecodeError or OSError. ``spec``: see
    ``decode_bytes``."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise ImageDecodeError("too_large", f"file is {size} bytes, limit is {max_bytes}")
    return decode_bytes(p.read_bytes(), max_pixels=max_pixels, spec=spec)
