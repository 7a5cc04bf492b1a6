"""Which decoder layers an option applies to: ``all``, ``every_other`` (0, 2, 4, ...) or a list of indices."""

from __future__ import annotations

LAYER_SPECS = ("all", "every_other")


def check_layer_spec(spec: str | list[int], name: str) -> str | list[int]:
    """The spec as given (a list copied out of hydra's ListConfig); a clear error naming ``name`` otherwise."""
    if isinstance(spec, str):
        if spec not in LAYER_SPECS:
            raise ValueError(f"{name}={spec!r}: 'all', 'every_other' or a list of indices")
        return spec
    spec = list(spec)
    if not spec or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        raise ValueError(f"{name}={spec!r}: a non-empty list of layer indices")
    return spec


def select_layers(spec: str | list[int], num_layers: int, name: str) -> list[int]:
    """The sorted layer indices ``spec`` picks out of ``num_layers``."""
    if spec == "all":
        return list(range(num_layers))
    if spec == "every_other":
        return list(range(0, num_layers, 2))
    if any(not 0 <= i < num_layers for i in spec):
        raise ValueError(f"{name} {spec}: indices must lie in [0, {num_layers})")
    return sorted(set(spec))
