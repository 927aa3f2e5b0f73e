"""The config schema validated two ways, side by side: pydantic v2 (installed with albumentations) against
`utils.config`'s own rules (`utils/schema.py`). Issue 26 asked whether the kept library could replace the rule
machinery; this script is the measurement behind the answer in docs/configuration.md.

    python scripts/compare_config_validators.py [--config configs/brisc_cpu_head.yaml]

Every schema dataclass is translated into a pydantic dataclass (extra keys forbidden, strict ints / strings /
bools, the `spec` rules as `Field(ge=..)`, `Literal[...]` choices and anchored patterns); list rules (`pair`,
`each`) have no declarative pydantic equivalent and are left to pydantic's type check, as a port would have to
add them as validators. Prints the validation time per config and each engine's message for typical mistakes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from pathlib import Path
from typing import Annotated, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydantic  # noqa: E402
from pydantic import ConfigDict, Field, TypeAdapter  # noqa: E402
from pydantic.dataclasses import dataclass as pydantic_dataclass  # noqa: E402

from utils.config import Config, ConfigError, config_from_dict, read_yaml_file  # noqa: E402
from utils.cli import run_main  # noqa: E402

MISTAKES = {
    "a value out of range": {"data": {"loader": {"batch_size": 0}}},
    "a misspelt key": {"train": {"epoch": 3}},
    "a value not among the choices": {"data": {"loader": {"cache": "gpu"}}},
    "a string where a number belongs": {"train": {"epochs": "5"}},
    "a range with low > high": {"data": {"augment": {"crop_scale": [0.9, 0.5]}}},
}


def pydantic_schema(cls: type, made: dict) -> type:
    """A pydantic dataclass with the fields, defaults and scalar rules of the schema dataclass `cls`."""
    if cls in made:
        return made[cls]
    hints = typing.get_type_hints(cls)
    namespace: dict = {"__annotations__": {}}
    for f in dataclasses.fields(cls):
        tp, rules = hints[f.name], f.metadata.get("rules", {})
        if dataclasses.is_dataclass(tp):
            sub = pydantic_schema(tp, made)
            namespace["__annotations__"][f.name] = sub
            namespace[f.name] = dataclasses.field(default_factory=sub)
            continue
        bounds = {k: rules[k] for k in ("ge", "gt", "le", "lt") if k in rules}
        if "choices" in rules and tp in (str, int):
            tp = Literal[tuple(rules["choices"])]
        if "pattern" in rules and tp is str:
            bounds["pattern"] = f"^({rules['pattern']})$"
        strict = tp in (int, bool, str)
        namespace["__annotations__"][f.name] = Annotated[tp, Field(strict=strict, **bounds)] if bounds or strict else tp
        namespace[f.name] = (f.default if f.default is not dataclasses.MISSING
                             else dataclasses.field(default_factory=f.default_factory))
    made[cls] = pydantic_dataclass(type(cls.__name__, (), namespace), config=ConfigDict(extra="forbid"))
    return made[cls]


def _per_call_ms(call, raw: dict, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call(raw)
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/brisc_cpu_head.yaml"))
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    raw = read_yaml_file(args.config, "config file")
    adapter = TypeAdapter(pydantic_schema(Config, {}))
    print(f"validating {args.config} ({args.repeats} times): pydantic {_per_call_ms(adapter.validate_python, raw, args.repeats):.3f} ms, "
          f"utils.config {_per_call_ms(config_from_dict, raw, args.repeats):.3f} ms")
    for what, bad in MISTAKES.items():
        try:
            adapter.validate_python(bad)
            theirs = "(accepted)"
        except pydantic.ValidationError as exc:
            theirs = " | ".join(line.strip() for line in str(exc).splitlines() if "errors.pydantic.dev" not in line)
        try:
            config_from_dict(bad, source="in exp.yaml")
            ours = "(accepted)"
        except ConfigError as exc:
            ours = str(exc)
        print(f"- {what}\n    pydantic:     {theirs}\n    utils.config: {ours}")


if __name__ == "__main__":
    run_main(main)
