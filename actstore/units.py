"""Values written by people: sizes (``2GiB``), counts (``20k``), layer lists (``0-3,10``), lists.

One module for the parsers the library (``stream(memory="2GiB")``) and the command line share.
Each raises a ``ValueError`` whose message names the value and shows a form that works.
"""

from __future__ import annotations

from typing import Any

_BYTE_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
               "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}


def parse_bytes(value: int | str) -> int:
    """``2147483648``, ``"2GiB"``, ``"512MB"``, ``"1.5G"`` -> bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper()
    number = text.rstrip("BKMGTI ")
    unit = text[len(number):].strip()
    try:
        return int(float(number) * _BYTE_UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(f"cannot read {value!r} as a size; write e.g. '2GiB', '512MB' or a number of bytes") from None


def parse_count(spec: str) -> int:
    """Token counts like ``20000``, ``20k``, ``5M``, ``1.5B``, ``2_000_000``."""
    text = spec.strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise ValueError(f"cannot read a count from {spec!r}: use e.g. 20000, 20k, 5M") from None
    if value <= 0 or value != int(value):
        raise ValueError(f"{spec!r} is not a positive whole count")
    return int(value)


def parse_layers(spec: str, n_layers: int | None = None) -> tuple[int, ...]:
    """``0-25``, ``3,7,11``, mixes like ``0-3,10``, or ``all`` (needs ``n_layers``), sorted unique."""
    if spec.strip() == "all":
        if n_layers is None:
            raise ValueError("'all' layers needs the model's depth")
        return tuple(range(n_layers))
    layers: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                layers.update(range(a, b + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise ValueError(f"cannot read layers {spec!r}: use ranges and lists like 0-25 or 3,7,11") from None
    if not layers:
        raise ValueError(f"no layers in {spec!r}")
    return tuple(sorted(layers))


def parse_list(spec: str, kind: type = float) -> tuple[Any, ...]:
    """``"16,32,64"`` -> a tuple of values."""
    try:
        return tuple(kind(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"cannot read {spec!r} as a comma list of {kind.__name__} values") from None
