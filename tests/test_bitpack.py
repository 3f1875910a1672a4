"""Bit packing at exactly b bits, against a bit-by-bit reference, for every b the format uses."""

import numpy as np
import pytest
import torch

from vqad.bitpack import pack_bits, packed_size, unpack_bits


def reference_pack(values, bits: int) -> bytes:
    """The spec, literally: value i's bit j is stream bit i·b + j; stream bit s is bit s%8 of byte s//8."""
    out = bytearray((len(values) * bits + 7) // 8)
    for i, v in enumerate(values):
        for j in range(bits):
            if (int(v) >> j) & 1:
                s = i * bits + j
                out[s // 8] |= 1 << (s % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 13))
def test_pack_matches_reference_and_round_trips(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 2, 7, 8, 9, 63, 257):
        v = rng.integers(0, 1 << bits, size=n)
        packed = pack_bits(v, bits)
        assert packed == reference_pack(v, bits)
        assert len(packed) == packed_size(n, bits) == -(-n * bits // 8)
        back = unpack_bits(packed, n, bits)
        assert back.dtype == np.int64 and np.array_equal(back, v)


@pytest.mark.parametrize("bits", range(1, 13))
def test_extreme_values_and_torch_input(bits):
    v = torch.tensor([0, (1 << bits) - 1, 0, (1 << bits) - 1, 1 % (1 << bits)])
    packed = pack_bits(v, bits)
    assert packed == reference_pack(v.tolist(), bits)
    assert unpack_bits(packed, 5, bits).tolist() == v.tolist()


def test_wider_widths_round_trip():
    rng = np.random.default_rng(0)
    for bits in (13, 16, 17, 24, 31, 32):
        v = rng.integers(0, 1 << bits, size=33)
        packed = pack_bits(v, bits)
        assert packed == reference_pack(v, bits)
        assert np.array_equal(unpack_bits(packed, 33, bits), v)


def test_known_bytes():
    assert pack_bits([1, 2, 3], 2) == bytes([0b00111001])
    assert pack_bits([5], 3) == bytes([5])
    assert pack_bits([0xABC, 0x123], 12) == bytes([0xBC, 0x3A, 0x12])  # low bits first


def test_rejects_values_that_do_not_fit():
    with pytest.raises(ValueError, match="2\\^4"):
        pack_bits([16], 4)
    with pytest.raises(ValueError):
        pack_bits([-1], 4)
    with pytest.raises(ValueError):
        pack_bits([0.5], 4)
    with pytest.raises(ValueError):
        pack_bits([1], 0)


def test_unpack_rejects_wrong_length_and_dirty_padding():
    packed = pack_bits([1, 2, 3], 3)  # 9 bits -> 2 bytes, 7 padding bits
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_bits(packed[:1], 3, 3)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_bits(packed + b"\0", 3, 3)
    dirty = packed[:1] + bytes([packed[1] | 0x80])
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(dirty, 3, 3)
