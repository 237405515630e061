"""Hostile image files for fuzzing the decoder and the daemon: valid seeds in every format and layout a
line might send, and seeded mutations of them (truncated, bit-flipped, wrong headers, zero-byte,
huge declared dimensions, bombs in chunk lengths, random bytes).

Deterministic for a seed, so a failing case can be rebuilt and looked at.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Case:
    name: str  # a file name (unique within a corpus; may sit in a subfolder)
    data: bytes
    how: str  # which generator made it (for failure messages)


def _photo(rng: np.random.Generator, h: int, w: int, c: int = 3) -> np.ndarray:
    small = rng.integers(0, 256, (max(h // 4, 1), max(w // 4, 1), c), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return img.reshape(h, w, c) if c == 1 else img


def _enc(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


def _multi(ext: str, frames: list[np.ndarray]) -> bytes:
    ok, buf = cv2.imencodemulti(ext, frames)
    assert ok, ext
    return buf.tobytes()


def seed_images(rng: np.random.Generator) -> dict[str, bytes]:
    """Valid files: 8/16-bit and float, 1/2/3/4 channels, single and multi-frame, many formats."""
    img = _photo(rng, 48, 64)
    grey = img[:, :, 0]
    rgba = np.dstack([img, grey])
    frames = [_photo(rng, 24, 32) for _ in range(3)]
    seeds = {
        "rgb8.png": _enc(".png", img), "grey8.png": _enc(".png", grey), "rgba8.png": _enc(".png", rgba),
        "rgb16.png": _enc(".png", img.astype(np.uint16) * 257), "grey16.png": _enc(".png", grey.astype(np.uint16) * 257),
        "rgba16.png": _enc(".png", rgba.astype(np.uint16) * 257),
        "rgb.jpg": _enc(".jpg", img), "grey.jpg": _enc(".jpg", grey),
        "progressive.jpg": _enc(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "rgb.bmp": _enc(".bmp", img), "grey.bmp": _enc(".bmp", grey),
        "rgb.tiff": _enc(".tiff", img), "grey16.tiff": _enc(".tiff", grey.astype(np.uint16) * 257),
        "float.tiff": _enc(".tiff", img.astype(np.float32) / 255.0),
        "rgba.tiff": _enc(".tiff", rgba),
        "rgb.webp": _enc(".webp", img), "rgb.ppm": _enc(".ppm", img), "grey.pgm": _enc(".pgm", grey),
        "bits.pbm": _enc(".pbm", (grey > 128).astype(np.uint8) * 255),
        "rgb.jp2": _enc(".jp2", img), "rgb.hdr": _enc(".hdr", img.astype(np.float32) / 255.0),
        "rgb.pfm": _enc(".pfm", img.astype(np.float32) / 255.0), "rgb.ras": _enc(".ras", img),
        "still.gif": _enc(".gif", img),
        "multipage.tiff": _multi(".tiff", frames), "animated.gif": _multi(".gif", frames),
        "animated.png": _multi(".png", frames), "animated.webp": _multi(".webp", frames),
    }
    return seeds


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def header_bombs() -> dict[str, bytes]:
    """Tiny files whose headers declare enormous images (decompression bombs)."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    idat = _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
    png = b"\x89PNG\r\n\x1a\n" + ihdr + idat + _png_chunk(b"IEND", b"")
    jpg = bytearray(_enc(".jpg", np.zeros((8, 8, 3), np.uint8)))
    sof = jpg.find(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 60_000, 60_000)
    bmp = bytearray(_enc(".bmp", np.zeros((4, 4, 3), np.uint8)))
    bmp[18:26] = struct.pack("<ii", 70_000, -70_000)
    gif = bytearray(_enc(".gif", np.zeros((4, 4, 3), np.uint8)))
    gif[6:10] = struct.pack("<HH", 65_535, 65_535)
    tif = bytearray(_enc(".tiff", np.zeros((4, 4), np.uint8)))
    # a TIFF whose IFD says 2^31 x 2^31 (ImageWidth/ImageLength tags rewritten as LONGs)
    ifd = struct.unpack("<I", tif[4:8])[0]
    for k in range(struct.unpack("<H", tif[ifd:ifd + 2])[0]):
        e = ifd + 2 + 12 * k
        if struct.unpack("<H", tif[e:e + 2])[0] in (256, 257):
            tif[e + 2:e + 12] = struct.pack("<HII", 4, 1, 1 << 31)
    pgm = b"P5\n1000000 1000000\n255\n" + b"\0" * 64
    return {"bomb.png": png, "bomb.jpg": bytes(jpg), "bomb.bmp": bytes(bmp), "bomb.gif": bytes(gif),
            "bomb.tiff": bytes(tif), "bomb.pgm": pgm}


# -- mutations -----------------------------------------------------------------------------------------------


def truncate(rng: np.random.Generator, data: bytes) -> bytes:
    return data[:int(rng.integers(0, len(data)))]


def bit_flips(rng: np.random.Generator, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def header_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    """Random bytes written into the first 64 (where the headers and lengths are)."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        b[int(rng.integers(0, min(len(b), 64)))] = int(rng.integers(0, 256))
    return bytes(b)


def big_length(rng: np.random.Generator, data: bytes) -> bytes:
    """A huge 16/32-bit value (either byte order) over a random early field: lengths, sizes, offsets."""
    b = bytearray(data)
    width = int(rng.choice([2, 4]))
    value = int(rng.choice([0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x0FFFFFFF]))
    value &= (1 << (8 * width)) - 1
    pos = int(rng.integers(0, max(min(len(b), 200) - width, 1)))
    b[pos:pos + width] = value.to_bytes(width, str(rng.choice(["big", "little"])))
    return bytes(b)


def wrong_header(rng: np.random.Generator, data: bytes) -> bytes:
    """Another format's magic number in front of (or over) this file's body."""
    magic = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\0\0\0\0WEBP",
             b"P6\n", b"\x00\x00\x00\x0cjP  "][int(rng.integers(0, 9))]
    return magic + data[len(magic):] if rng.random() < 0.5 else magic + data


def splice(rng: np.random.Generator, data: bytes) -> bytes:
    """A chunk deleted, duplicated or filled with garbage somewhere in the body."""
    b = bytearray(data)
    i = int(rng.integers(0, len(b)))
    n = int(rng.integers(1, 64))
    op = int(rng.integers(0, 3))
    if op == 0:
        del b[i:i + n]
    elif op == 1:
        b[i:i] = b[i:i + n]
    else:
        b[i:i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(b)


MUTATIONS: dict[str, Callable[[np.random.Generator, bytes], bytes]] = {
    "truncate": truncate, "bitflip": bit_flips, "header": header_bytes, "biglen": big_length,
    "wronghdr": wrong_header, "splice": splice,
}


def build_corpus(n: int, seed: int = 0) -> list[Case]:
    """``n`` cases: every seed and bomb once, a few odd ones, the rest seeded mutations of the seeds."""
    rng = np.random.default_rng(seed)
    seeds = seed_images(rng)
    fixed = {**seeds, **header_bombs(), "zero.png": b"", "text.jpg": b"not an image at all\n" * 8,
             "random.bin": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
             "jpeg-named.png": seeds["rgb.jpg"], "png-named.jpg": seeds["rgb8.png"], "noext": seeds["rgb.bmp"]}
    cases = [Case(f"fixed/{name}", data, "fixed") for name, data in fixed.items()]
    names = sorted(seeds)
    kinds = sorted(MUTATIONS)
    i = 0
    while len(cases) < n:
        src = names[int(rng.integers(0, len(names)))]
        kind = kinds[i % len(kinds)]
        data = MUTATIONS[kind](rng, seeds[src])
        cases.append(Case(f"m{i:05d}-{kind}-{src}", data, f"{kind}({src})"))
        i += 1
    return cases[:n]
