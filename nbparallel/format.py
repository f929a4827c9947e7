"""One way to print bytes, seconds and engine ranges, and one way to read a range.

Pure: the standard library and :mod:`nbparallel.errors` only.

Every message, repr, dashboard and status table prints through these, so the same 10 MiB reads the
same everywhere. Bytes are in binary units (KiB = 1024 B), as nvidia-smi and ``free -h`` count
them; throughputs measured by ``nbparallel bench`` stay in GB/s (1e9 B/s), as bandwidth is quoted.

>>> nbytes(10 * 2**20), seconds(0.0123), ranges([6, 0, 1, 2, 3]), parse_ranges("0-3,6", "--engines")
('10.0 MiB', '12.3 ms', '0-3,6', [0, 1, 2, 3, 6])
"""

from __future__ import annotations

import re
from typing import Iterable

from .errors import UsageError

__all__ = ["nbytes", "seconds", "ranges", "parse_ranges"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def nbytes(n: float | None) -> str:
    """A byte count in binary units: whole bytes below 1 KiB, one decimal below 100 of a unit,
    none from 100 up; ``"?"`` for an unknown (``None``) amount.

    >>> nbytes(0), nbytes(512), nbytes(1023), nbytes(1024), nbytes(1536)
    ('0 B', '512 B', '1023 B', '1.0 KiB', '1.5 KiB')
    >>> nbytes(10 * 2**20), nbytes(16_000_000), nbytes(512 * 2**20), nbytes(141 * 2**30)
    ('10.0 MiB', '15.3 MiB', '512 MiB', '141 GiB')
    >>> nbytes(3 * 2**60), nbytes(-2048), nbytes(None)
    ('3072 PiB', '-2.0 KiB', '?')
    """
    if n is None:
        return "?"
    value, unit = float(n), _UNITS[0]
    for unit in _UNITS:
        if abs(value) < 1023.5 or unit == _UNITS[-1]:
            break
        value /= 1024
    if unit == "B" or abs(value) >= 99.95:
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}"


def seconds(s: float) -> str:
    """A duration to three significant digits, in s, ms or µs (whole seconds from 1000 s up).

    >>> seconds(4.567), seconds(0.0123), seconds(2.5e-5), seconds(0.9999), seconds(4321.0), seconds(0)
    ('4.57 s', '12.3 ms', '25 µs', '1 s', '4321 s', '0 s')
    """
    t = abs(s)
    if t == 0 or t >= 0.9995:
        return f"{s:.0f} s" if t >= 999.5 else f"{s:.3g} s"
    if t >= 0.9995e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def ranges(ids: Iterable[int]) -> str:
    """Engine (or device) ids as the range list :func:`parse_ranges` reads; ``""`` for none.

    >>> ranges([0, 1, 2, 3, 6]), ranges([5, 3, 4, 4]), ranges([7]), ranges([])
    ('0-3,6', '3-5', '7', '')
    """
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(ids)):
        if run and i != run[-1] + 1:
            out.append(_run(run))
            run = []
        run.append(i)
    if run:
        out.append(_run(run))
    return ",".join(out)


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


_RANGE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")
_HINT = "Write ids and ranges separated by commas, like 0-3,6."
#: The most ids one range may name: more than any pool has, few enough to expand at once.
MAX_RANGE = 100_000


def parse_ranges(spec: str, what: str, *, item: str = "an id", hint: str = _HINT) -> list[int]:
    """Read a list of ids and ranges such as ``"0-3,6"`` (never evaluated): ids in the order given,
    each once. ``what`` names the option in the :class:`~nbparallel.errors.UsageError` raised for
    anything else, ``item`` what one id is, and ``hint`` says how to write it.

    >>> parse_ranges("0-3,6", "--engines"), parse_ranges(" 1 - 2 , 5 ", "--engines")
    ([0, 1, 2, 3, 6], [1, 2, 5])
    >>> parse_ranges("2,2,1", "--gpus")
    [2, 1]
    >>> parse_ranges("0-", "--engines", item="an engine id")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nbparallel.errors.UsageError: cannot read --engines '0-': '0-' is not an engine id or a range. Write...
    >>> parse_ranges("3-1", "--engines")
    Traceback (most recent call last):
    ...
    nbparallel.errors.UsageError: cannot read --engines '3-1': the range 3-1 runs backwards; write 1-3.
    """
    ids: dict[int, None] = {}
    for part in spec.split(","):
        m = _RANGE.fullmatch(part)
        if not m:
            raise UsageError(f"cannot read {what} {spec!r}: {part.strip()!r} is not {item} or a range. "
                             f"{hint}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"cannot read {what} {spec!r}: the range {lo}-{hi} runs backwards; "
                             f"write {hi}-{lo}.")
        if hi - lo >= MAX_RANGE:
            raise UsageError(f"cannot read {what} {spec!r}: the range {lo}-{hi} names "
                             f"{hi - lo + 1:,} ids, more than any cluster here has ({MAX_RANGE:,} "
                             f"at most). {hint}")
        ids.update(dict.fromkeys(range(lo, hi + 1)))
    return list(ids)
