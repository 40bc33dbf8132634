"""Notebook support: checking papermill parameters against the types the parameters cell declares.

A notebook's `parameters` cell declares each parameter with its type, `epochs: int = 1`; papermill
injects plain assignments after it (`epochs = 300`). The cell after that calls
`check_parameters(globals())`, which compares every declared parameter's current value with its
declared type and stops the run with a message naming the parameter when they disagree.
"""
from __future__ import annotations

from typing import Any, Dict


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def check_parameters(namespace: Dict[str, Any], choices: Dict[str, tuple] | None = None) -> Dict[str, Any]:
    """Validate the annotated parameters in `namespace` (a notebook's globals()); return them as a dict.

    An int is accepted (and converted) where a float is declared, since `-p lr 1` arrives as an int.
    `choices` maps a parameter name to its valid values."""
    declared = namespace.get("__annotations__", {})
    if not declared:
        raise RuntimeError("no annotated parameters found: declare them in the parameters cell as `name: type = value`")
    params = {}
    for name, expected in declared.items():
        value = namespace.get(name)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            namespace[name] = value
        ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
        if not ok:
            raise TypeError(f"parameter {name!r} must be {_type_name(expected)}, got {type(value).__name__} "
                            f"{value!r}; pass e.g. `-p {name} <{_type_name(expected)}>` to papermill")
        if choices and name in choices and value not in choices[name]:
            raise ValueError(f"parameter {name!r} is {value!r}; valid values: {', '.join(map(str, choices[name]))}")
        params[name] = value
    return params
