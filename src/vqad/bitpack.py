"""Bit packing: unsigned integers stored at exactly ``b`` bits each (the .vqad index chunks).

Bit order is LSB-first and little-endian across the whole stream: value ``i`` occupies stream bits
``[i·b, (i+1)·b)``, bit ``j`` of value ``i`` is stream bit ``i·b + j``, and stream bit ``s`` is bit
``s % 8`` of byte ``s // 8``. The unused high bits of the last byte are zero. So ``n`` values take
exactly ``ceil(n·b / 8)`` bytes: the paper's ``m·b`` bits plus at most 7 bits of padding.

>>> pack_bits(np.array([1, 2, 3]), 2).hex()   # 01 | 10 << 2 | 11 << 4 = 0b111001
'39'
>>> unpack_bits(bytes.fromhex('39'), 3, 2).tolist()
[1, 2, 3]
"""

from __future__ import annotations

import numpy as np

MAX_PACK_BITS = 32


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by ``n`` values of ``bits`` bits: ``ceil(n·bits / 8)``."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_PACK_BITS:
        raise ValueError(f"bit width must be an integer in 1..{MAX_PACK_BITS}, got {bits!r}")


def pack_bits(values, bits: int) -> bytes:
    """Pack unsigned integers at ``bits`` bits each.

    Args:
        values: ``(n,)`` integers (numpy array, torch tensor or sequence), each in ``[0, 2^bits)``.
        bits: the width b, 1..32.
    Returns:
        ``ceil(n·bits / 8)`` bytes.
    Raises:
        ValueError: a value does not fit in ``bits`` bits (it would be silently truncated otherwise).
    """
    _check_bits(bits)
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    v = np.asarray(values).reshape(-1)
    if v.size == 0:
        return b""
    if v.dtype.kind not in "iu":
        raise ValueError(f"pack_bits needs integers, got dtype {v.dtype}")
    v = v.astype(np.int64)
    if v.min() < 0 or v.max() >= (1 << bits):
        raise ValueError(f"values must lie in [0, 2^{bits}) to be packed at {bits} bits, got [{v.min()}, {v.max()}]")
    # (n, b) matrix of bits, flattened row-major = value after value, low bit first
    stream = ((v[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little").tobytes()


def unpack_bits(data, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` values of ``bits`` bits from ``data``.

    Args:
        data: bytes-like of length exactly ``ceil(n·bits / 8)``.
    Returns:
        ``(n,)`` int64 array.
    Raises:
        ValueError: ``data`` has the wrong length, or its padding bits are not zero.
    """
    _check_bits(bits)
    need = packed_size(n, bits)
    buf = np.frombuffer(memoryview(data), dtype=np.uint8)
    if buf.size != need:
        raise ValueError(f"{n} values of {bits} bits take {need} bytes, got {buf.size}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    pad = need * 8 - n * bits
    if pad and int(buf[-1]) >> (8 - pad):
        raise ValueError("non-zero padding bits after the last packed value")
    if 8 % bits == 0:  # 1, 2, 4 or 8 bits: whole values per byte, low bits first, written straight to int64
        out = np.empty((buf.size, 8 // bits), dtype=np.int64)
        for j in range(8 // bits):
            np.bitwise_and(buf >> np.uint8(j * bits), np.uint8((1 << bits) - 1), out=out[:, j], casting="unsafe")
        return out.reshape(-1)[:n]
    stream = np.unpackbits(buf, bitorder="little", count=n * bits).reshape(n, bits)
    if bits <= 8:  # a small lookup through uint8 weights is ~3x faster than an int64 dot
        weights = (1 << np.arange(bits)).astype(np.uint16)
        return (stream.astype(np.uint16) @ weights).astype(np.int64)
    weights = 1 << np.arange(bits, dtype=np.int64)
    return stream.astype(np.int64) @ weights
