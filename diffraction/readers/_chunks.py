"""Structural checks of compressed HDF5 chunks before they are decompressed, and a fast path for EIGER frames.

The bitshuffle filter (32008) trusts the per-block sizes stored inside a chunk
and reads past the chunk when they are corrupt, and the LZ4 filter (32004)
decompresses with ``LZ4_decompress_fast``, which trusts the LZ4 stream itself:
either can crash the whole process on a damaged file. So before a frame is
decompressed its raw chunks are walked here (a few ms per 16M frame) and a bad
one becomes an ImageReadError instead of a segmentation fault.

The fast path (:func:`frame_reader`): a frame stored as one bitshuffle-LZ4 chunk, as
DECTRIS detectors and their file writers store it, is read as its raw chunk and
decompressed by the ``bitshuffle`` package outside HDF5. h5py serialises every HDF5
call behind one lock, and HDF5's filter decompresses inside it, so a worker's threads
would otherwise read frames one at a time; ``bitshuffle`` releases the GIL.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np

BITSHUFFLE_FILTER = 32008
LZ4_FILTER = 32004
_HEADER = struct.Struct(">QI")  # uncompressed bytes, block size in bytes (big-endian)
_BLOCK = struct.Struct(">i")  # each block's compressed size (a C int32)
_BSHUF_MULT = 8  # bitshuffle blocks hold a multiple of 8 elements


def _filters(dataset: Any) -> list[tuple[int, tuple[int, ...]]]:
    plist = dataset.id.get_create_plist()
    filters = (plist.get_filter(i) for i in range(plist.get_nfilters()))
    return [(int(code), tuple(int(v) for v in values)) for code, _flags, values, _name in filters]


def _check_bitshuffle(raw: bytes, expected: int, elem_size: int) -> str | None:
    if len(raw) < _HEADER.size:
        return "chunk is shorter than its header"
    total, block_bytes = _HEADER.unpack_from(raw, 0)
    if total != expected:
        return f"chunk header gives {total} bytes, expected {expected}"
    if block_bytes == 0 or block_bytes % elem_size or (block_bytes // elem_size) % _BSHUF_MULT:
        return f"invalid bitshuffle block size {block_bytes}"
    size, block = total // elem_size, block_bytes // elem_size
    last = size % block
    n_blocks = size // block + (1 if last - last % _BSHUF_MULT else 0)
    pos, end, unpack = _HEADER.size, len(raw), _BLOCK.unpack_from
    for _ in range(n_blocks):
        if pos + 4 > end:
            return "chunk ends inside its block table"
        (compressed,) = unpack(raw, pos)
        pos += 4 + compressed
        if compressed <= 0 or pos > end:
            return f"block size {compressed} runs past the end of the chunk"
    if pos + (size % _BSHUF_MULT) * elem_size > end:
        return "chunk is too short for its trailing bytes"
    return None


def _lz4_block_ok(src: np.ndarray, out_size: int) -> bool:
    """Dry-run an LZ4 block: every literal and match stays in bounds and yields ``out_size`` bytes."""
    n, i, o = src.size, 0, 0
    while i < n:
        token = src[i]
        i += 1
        literals = token >> 4
        if literals == 15:
            while True:
                if i >= n:
                    return False
                extra = src[i]
                i += 1
                literals += extra
                if extra != 255:
                    break
        i += literals
        o += literals
        if i > n or o > out_size:
            return False
        if i == n:
            return o == out_size  # the last sequence is literals only
        if i + 2 > n:
            return False
        offset = int(src[i]) | (int(src[i + 1]) << 8)
        i += 2
        if offset == 0 or offset > o:
            return False
        match = token & 15
        if match == 15:
            while True:
                if i >= n:
                    return False
                extra = src[i]
                i += 1
                match += extra
                if extra != 255:
                    break
        o += match + 4
        if o > out_size:
            return False
    return False


_compiled_lz4_check: Callable[[np.ndarray, int], bool] | None = None


def _lz4_check() -> Callable[[np.ndarray, int], bool]:
    """The dry run compiled with numba on first use (a byte loop); pure Python without numba.

    Compiled lazily so importing the readers does not import numba: only
    legacy LZ4-filtered (32004) files need it.
    """
    global _compiled_lz4_check
    if _compiled_lz4_check is None:
        try:
            import numba

            _compiled_lz4_check = numba.njit(cache=True, nogil=True)(_lz4_block_ok)
        except ImportError:  # pragma: no cover - numba is a dependency
            _compiled_lz4_check = _lz4_block_ok
    return _compiled_lz4_check


def _check_lz4(raw: bytes, expected: int) -> str | None:
    if len(raw) < _HEADER.size:
        return "chunk is shorter than its header"
    total, block = _HEADER.unpack_from(raw, 0)
    if total != expected:
        return f"chunk header gives {total} bytes, expected {expected}"
    block = min(block, total)
    if block == 0:
        return "LZ4 block size is 0"
    buffer = np.frombuffer(raw, dtype=np.uint8)
    block_ok = _lz4_check()
    pos, done = _HEADER.size, 0
    while done < total:
        this = min(block, total - done)
        if pos + 4 > len(raw):
            return "chunk ends inside its block table"
        (compressed,) = struct.unpack_from(">I", raw, pos)
        pos += 4
        if pos + compressed > len(raw):
            return f"block size {compressed} runs past the end of the chunk"
        if compressed != this and not block_ok(buffer[pos : pos + compressed], this):
            return "corrupt LZ4 block"
        pos += compressed
        done += this
    return None


def chunk_checker(dataset: Any) -> Callable[[int], str | None] | None:
    """A function checking the raw chunks of frame *i* of a 3-D dataset, or None if nothing to check.

    The function returns None when the chunks are sound, else a description.
    Only pipelines of a single bitshuffle or LZ4 filter need checking: HDF5's
    own deflate/shuffle filters already bound their reads.
    """
    if dataset.chunks is None or dataset.is_virtual:
        return None
    filters = _filters(dataset)
    if len(filters) != 1 or filters[0][0] not in (BITSHUFFLE_FILTER, LZ4_FILTER):
        return None
    code, values = filters[0]
    if code == BITSHUFFLE_FILTER and (len(values) < 5 or values[4] == 0):
        return None  # bitshuffle without compression: fixed-size, nothing to trust
    elem_size = dataset.dtype.itemsize
    cz, cy, cx = dataset.chunks
    expected = cz * cy * cx * elem_size
    _, ny, nx = dataset.shape

    def check(frame: int) -> str | None:
        z0 = frame - frame % cz
        for y0 in range(0, ny, cy):
            for x0 in range(0, nx, cx):
                try:
                    mask, raw = dataset.id.read_direct_chunk((z0, y0, x0))
                except (OSError, RuntimeError, ValueError, KeyError) as exc:
                    return f"chunk at {(z0, y0, x0)} cannot be read ({exc})"
                if mask & 1:
                    continue  # the filter was skipped for this chunk: stored raw
                raw = bytes(raw)
                problem = (
                    _check_bitshuffle(raw, expected, elem_size)
                    if code == BITSHUFFLE_FILTER
                    else _check_lz4(raw, expected)
                )
                if problem:
                    return f"chunk at {(z0, y0, x0)}: {problem}"
        return None

    return check


def frame_reader(dataset: Any) -> Callable[[int], np.ndarray] | None:
    """A function reading frame *i* of a 3-D dataset stored one bitshuffle-LZ4 chunk per frame (checked,
    then decompressed outside HDF5), or None for any other layout (read it through HDF5).

    The function raises :class:`CorruptChunk` naming what is wrong with a damaged chunk."""
    try:
        import bitshuffle
    except ImportError:  # pragma: no cover - a dependency; HDF5's filter still reads the file
        return None
    if dataset.chunks is None or dataset.is_virtual:
        return None
    filters = _filters(dataset)
    if len(filters) != 1 or filters[0][0] != BITSHUFFLE_FILTER:
        return None
    values = filters[0][1]
    if len(values) < 5 or values[4] != 2:  # bitshuffle's compression flag: 2 is LZ4
        return None
    _, ny, nx = dataset.shape
    if dataset.chunks != (1, ny, nx):
        return None
    dtype = dataset.dtype
    expected = ny * nx * dtype.itemsize

    def read(frame: int) -> np.ndarray:
        try:
            mask, raw = dataset.id.read_direct_chunk((frame, 0, 0))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise CorruptChunk(f"chunk of frame {frame} cannot be read ({exc})") from None
        raw = bytes(raw)
        if mask & 1:  # the filter was skipped for this chunk: stored as it is
            if len(raw) != expected:
                raise CorruptChunk(f"unfiltered chunk of frame {frame} has {len(raw)} bytes, expected {expected}")
            return np.frombuffer(raw, dtype=dtype).reshape(ny, nx)
        problem = _check_bitshuffle(raw, expected, dtype.itemsize)
        if problem:
            raise CorruptChunk(f"chunk at {(frame, 0, 0)}: {problem}")
        _, block_bytes = _HEADER.unpack_from(raw, 0)
        body = np.frombuffer(raw, dtype=np.uint8, offset=_HEADER.size)
        return bitshuffle.decompress_lz4(body, (ny, nx), dtype, block_bytes // dtype.itemsize)

    return read


class CorruptChunk(Exception):
    """A compressed chunk that cannot be decompressed safely (the message says why)."""
