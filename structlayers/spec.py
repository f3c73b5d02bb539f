"""Spec strings: "btt:rank=2" -> BTT(i, o, rank=2). Values: ints, floats, words, and
x-separated int tuples ("tt:cores=3,rank=8x4", "btt:in_factors=32x32")."""

from .base import StructuredLinear
from .layers import BTT, TT, Dense, Kronecker, LowRank, Monarch, Tucker

STRUCTURES: dict[str, type[StructuredLinear]] = {
    cls.name: cls for cls in (Dense, LowRank, Kronecker, Monarch, BTT, TT, Tucker)
}


def parse_spec(spec: str) -> tuple[type[StructuredLinear], dict]:
    """'tt:cores=3,rank=8' -> (TT, {'cores': 3, 'rank': 8})."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string such as 'btt:rank=2', got {type(spec).__name__}")
    name, _, args = spec.strip().partition(":")
    cls = STRUCTURES.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown structure {name!r} in spec {spec!r}; valid: {sorted(STRUCTURES)}")
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"spec {spec!r}: expected key=value, got {item!r}")
        if key in kwargs:
            raise ValueError(f"spec {spec!r} sets {key!r} twice")
        kwargs[key] = _parse_value(value)
    return cls, kwargs


def build(spec: str, in_features: int, out_features: int, **kwargs) -> StructuredLinear:
    """A layer from a spec string; extra kwargs (bias, device, dtype, ...) are passed on."""
    cls, args = parse_spec(spec)
    try:
        return cls(in_features, out_features, **args, **kwargs)
    except TypeError as error:
        if "unexpected keyword" in str(error) or "multiple values" in str(error):
            raise ValueError(f"spec {spec!r}: {error}") from None
        raise


def _parse_value(text: str):
    if "x" in text and all(part.isdigit() for part in text.split("x")):
        return tuple(int(part) for part in text.split("x"))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("none", "null"):
        return None
    return text
