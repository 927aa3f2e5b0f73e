"""Validation rules declared beside a dataclass field's default: `spec(16, ge=1)`.

Rules: ge / gt / le / lt (numeric bounds), choices (allowed scalars), pattern (+ pattern_help) and nonempty for
strings, each (bounds for every item of a list), pair (a [low, high] list with low <= high). `violation` says
what is allowed when a value breaks them; utils/config.py checks every field of a config with it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from typing import Any, Callable, Optional

PROB = {"ge": 0.0, "le": 1.0}  # a probability


def spec(default: Any = dataclasses.MISSING, *, factory: Optional[Callable[[], Any]] = None, **rules: Any) -> Any:
    """A dataclass field with validation rules in its metadata (the rule names: see the module docstring)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rules": rules})
    return field(default=default, metadata={"rules": rules})


def _bound_text(rules: dict) -> str:
    low = [f"{'>=' if 'ge' in rules else '>'} {rules.get('ge', rules.get('gt'))}"] if {"ge", "gt"} & set(rules) else []
    high = [f"{'<=' if 'le' in rules else '<'} {rules.get('le', rules.get('lt'))}"] if {"le", "lt"} & set(rules) else []
    return " and ".join(low + high)


def _out_of_bounds(value: Any, rules: dict) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return bool({"ge", "gt", "le", "lt"} & set(rules))
    return (("ge" in rules and not value >= rules["ge"]) or ("gt" in rules and not value > rules["gt"])
            or ("le" in rules and not value <= rules["le"]) or ("lt" in rules and not value < rules["lt"]))


def violation(value: Any, rules: dict) -> Optional[str]:
    """What is allowed, when `value` breaks one of the field's `rules`; None when it fits (or is None)."""
    if value is None or not rules:
        return None
    if isinstance(value, list):
        each = rules.get("each", {})
        if rules.get("pair") and (len(value) != 2 or _out_of_bounds(value[0], each) or _out_of_bounds(value[1], each)
                                  or value[0] > value[1]):
            items = f" with each {_bound_text(each)}" if each else ""
            return f"a pair [low, high] with low <= high{items}"
        if any(_out_of_bounds(v, each) for v in value):
            return f"a list of numbers {_bound_text(each)}"
        return None
    if "choices" in rules and value not in rules["choices"]:
        alternatives = ["null or a list of numbers"] if "each" in rules else []
        return "one of " + ", ".join([str(c) for c in rules["choices"]] + alternatives)
    if isinstance(value, str):
        if rules.get("nonempty") and not value.strip():
            return "a non-empty string"
        if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
            return rules.get("pattern_help", f"a string matching {rules['pattern']}")
        return None
    if _out_of_bounds(value, rules):
        kind = "an integer" if isinstance(value, int) else "a number"
        return f"{kind} {_bound_text(rules)}"
    return None
