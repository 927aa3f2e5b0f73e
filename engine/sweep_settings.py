"""The settings of a sweep (`engine.sweep`): `--grid KEY=V1,V2,...` expanded to their cartesian product, or the
named runs of a `--runs FILE.yaml`, each a name and its `key=value` overrides."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.config import ConfigError, parse_override

# Keys the sweep sets itself for every run: where it trains and with which seed.
SWEEP_KEYS = ("experiment.name", "experiment.work_dir", "experiment.seed")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


@dataclass
class Setting:
    """One row of the table: a name and the `key=value` overrides it applies to the base config."""

    name: str
    overrides: list[str]


def split_values(text: str) -> list[str]:
    """`8,16,32` -> ['8', '16', '32']; commas inside brackets, braces or quotes do not split (`[0.4,0.2],[]`)."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    parts.append(current.strip())
    return parts


def override_text(key: str, value: Any) -> str:
    """`key=value` with the value written so that `--opts` parsing (YAML) reads it back unchanged."""
    dumped = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return f"{key}={dumped.removesuffix('...').strip()}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text).strip("-") or "value"


def expand_grid(specs: Sequence[str]) -> list[Setting]:
    """The cartesian product of `KEY=V1,V2,...` specs, one setting per combination, named `leaf=value_...`."""
    if not specs:
        raise ConfigError("--grid is empty: give at least one KEY=V1,V2,... (e.g. model.kwargs.ham_rank=8,16,32)")
    keys, values = [], []
    for spec in specs:
        if "=" not in spec or not spec.split("=", 1)[0].strip():
            raise ConfigError(f"--grid '{spec}' must look like section.key=value1,value2,...")
        key, raw = (part.strip() for part in spec.split("=", 1))
        if key in keys:
            raise ConfigError(f"--grid names '{key}' twice: give all its values in one KEY=V1,V2,... entry")
        options = split_values(raw)
        if any(not option for option in options):
            raise ConfigError(f"--grid '{spec}' has an empty value: separate values with single commas")
        for option in options:
            parse_override(f"{key}={option}")  # the same parsing as --opts (errors name the entry)
        keys.append(key)
        values.append(options)
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    labels = [leaf if leaves.count(leaf) == 1 else key for leaf, key in zip(leaves, keys)]
    settings = []
    for combo in itertools.product(*values):
        name = "_".join(_safe_name(f"{label}={value}") for label, value in zip(labels, combo))
        settings.append(Setting(name, [f"{key}={value}" for key, value in zip(keys, combo)]))
    return settings


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with the same key twice (PyYAML would keep the last one silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"'{key}' appears twice in one mapping (line {key_node.start_mark.line + 1}): names and "
                              "keys must be unique")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_runs_file(path: Path) -> list[Setting]:
    """Settings from a YAML file: `runs: {name: {dotted.key: value, ...}, ...}` (an empty mapping: the config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"runs file '{path}' does not exist")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"runs file '{path}': {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"runs file '{path}' is not valid YAML: {exc}") from None
    runs = raw.get("runs") if isinstance(raw, dict) else None
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"runs file '{path}' must hold a non-empty mapping 'runs:' of run names to overrides "
                          "(e.g. runs: {baseline: {}, no_context: {model.kwargs.context: none}})")
    settings = []
    for name, overrides in runs.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ConfigError(f"runs file '{path}': run name {name!r} must use letters, digits, '_', '.', '=', '+' "
                              "or '-' (it names a folder)")
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"runs file '{path}': run '{name}' must be a mapping of dotted config keys to values, "
                              f"got {overrides!r}")
        settings.append(Setting(name, [override_text(str(key), value) for key, value in overrides.items()]))
    return settings


def check_names(settings: Sequence[Setting]) -> None:
    """Refuse two settings of the same name (they would share folders) and settings that set the sweep's keys."""
    seen: dict[str, Setting] = {}
    for setting in settings:
        if setting.name in seen:
            first, second = (" ".join(s.overrides) or "the config" for s in (seen[setting.name], setting))
            raise ConfigError(f"two runs are named '{setting.name}' ({first}; {second}): give every run its own name")
        seen[setting.name] = setting
        for text in setting.overrides:
            key = text.split("=", 1)[0].strip()
            if key in SWEEP_KEYS:
                raise ConfigError(f"run '{setting.name}' sets '{key}', which the sweep sets for every run (seeds: "
                                  "--seeds; folders: --out)")


