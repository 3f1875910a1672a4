"""Transfer rates as people write them: ``--bandwidth 1Mbit``, ``200kB/s``, ``56kbps``.

Shared by ``vqad serve`` (which throttles what it sends) and ``vqad view`` (which throttles what it
reads), so that a progressive stream can be watched arriving LOD by LOD.
"""

from __future__ import annotations

import math
import re

from vqad.errors import InputError

_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
           "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
_RATE = re.compile(r"^\s*(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>[A-Za-z/]+)\s*$")
_UNIT = re.compile(r"^(?P<prefix>[kKmMgGtT]i?)?(?P<base>bits?|bytes?|B|b)$")
EXAMPLES = "1Mbit, 500kbit, 56kbps, 200kB/s or 2MB/s"


def parse_rate(text: str) -> float:
    """A rate such as ``"1Mbit"`` -> bytes per second (``125000.0``).

    Units: ``bit``, ``kbit``, ``Mbit``, ``Gbit`` (also ``kbps``, ``Mbit/s``) are bits per second;
    ``B/s``, ``kB/s``, ``MB/s``, ``GB/s`` (the ``/s`` optional) are bytes per second. ``k``, ``M``,
    ``G`` are decimal (1000); ``Ki``, ``Mi``, ``Gi`` binary (1024). A bare ``b`` is read as bits only
    in ``bps`` (``Mb`` alone is ambiguous and refused), and a number needs a unit.

    >>> parse_rate("1Mbit"), parse_rate("200kB/s"), parse_rate("56kbps"), parse_rate("1MiB/s")
    (125000.0, 200000.0, 7000.0, 1048576.0)

    Raises:
        InputError: the text is not a positive, finite rate with a unit.
    """
    m = _RATE.match(str(text))
    if m is None:
        try:
            float(text)
        except (TypeError, ValueError):
            pass
        else:  # bits or bytes? a bare number cannot say
            raise InputError(f"bandwidth {text!r} needs a unit (bits or bytes per second?), e.g. {EXAMPLES}")
        raise InputError(f"bandwidth {text!r} is not a rate: write a number and a unit, e.g. {EXAMPLES}")
    unit = m["unit"]
    if unit.endswith("/s"):
        unit = unit[:-2]
    elif unit.endswith("ps"):  # kbps, Mbps (bits), MBps (bytes)
        unit = unit[:-2]
    u = _UNIT.match(unit)
    if u is None:
        raise InputError(f"bandwidth {text!r}: unknown unit {m['unit']!r}; use bits (bit, kbit, Mbit, Gbit) or bytes "
                         f"per second (B/s, kB/s, MB/s, GB/s), e.g. {EXAMPLES}")
    base = u["base"]
    if base == "b" and not m["unit"].endswith("ps"):
        raise InputError(f"bandwidth {text!r}: is {m['unit']!r} bits or bytes? Write {u['prefix'] or ''}bit for bits or "
                         f"{u['prefix'] or ''}B/s for bytes per second")
    bits = base in ("b", "bit", "bits")
    value = float(m["num"]) * _PREFIX[(u["prefix"] or "").lower()] / (8.0 if bits else 1.0)
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"bandwidth {text!r} must be a positive, finite rate, e.g. {EXAMPLES}")
    return value


def format_rate(bytes_per_second: float) -> str:
    """``125000.0`` -> ``"1 Mbit/s (125 kB/s)"``: both ways people read a rate."""
    def si(v: float, unit: str) -> str:
        for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")):
            if v >= factor:
                return f"{v / factor:.4g} {prefix}{unit}"
        return f"{v:.3g} {unit}"
    return f"{si(bytes_per_second * 8, 'bit/s')} ({si(bytes_per_second, 'B/s')})"


__all__ = ["parse_rate", "format_rate"]
