"""An external dataset described once in a YAML file (configs/external/*.yaml), so test.py and engine.sweep
score it the same way: `test.py --external FILE` is `--data-root --data-format --class-map --layout` in one.

    external:
      name: pmram                        # how tables name the set (the report folder: test_ext_<root name>_test)
      root: ../shared/data/pmram         # relative paths are read from the current directory
      data_format: imagefolder           # brisc | imagefolder | pairs
      class_map: {512Glioma: glioma, ...}
      layout: [data.layout.test_dir=.]          # the dataset's layout keys, as test.py --layout takes them
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from utils.config import ConfigError, read_yaml_file

FORMATS = ("brisc", "imagefolder", "pairs")


@dataclass(frozen=True)
class ExternalSet:
    name: str
    root: str
    data_format: str
    class_map: Optional[dict] = None
    layout: list = field(default_factory=list)
    source: str = ""  # the file it was read from

    @property
    def folder(self) -> str:
        """The folder test.py writes this set's report into, inside the run directory."""
        return f"test_ext_{Path(self.root).name}_test"


def read_external_set(path: Path) -> ExternalSet:
    """The `external:` mapping of a YAML file; every mistake names the file and the key."""
    where = f"external-set file '{path}'"
    raw = read_yaml_file(path, "external-set file", " (see configs/external/pmram.yaml for the format)")
    body = raw.get("external") if isinstance(raw, dict) else None
    if not isinstance(body, dict):
        raise ConfigError(f"{where} must hold a mapping under `external:` (name, root, data_format, class_map, "
                          "layout)")
    unknown = sorted(set(body) - {"name", "root", "data_format", "class_map", "layout"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) external.{', external.'.join(unknown)} (known: name, root, "
                          "data_format, class_map, layout)")
    for key in ("root", "data_format"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise ConfigError(f"{where}: external.{key} is required (a string)")
    if body["data_format"] not in FORMATS:
        raise ConfigError(f"{where}: external.data_format must be one of {', '.join(FORMATS)}, got "
                          f"'{body['data_format']}'")
    class_map = body.get("class_map")
    if class_map is not None and not (isinstance(class_map, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in class_map.items())):
        raise ConfigError(f"{where}: external.class_map must map folder names to class names (strings)")
    layout = body.get("layout") or []
    if not (isinstance(layout, list) and all(isinstance(item, str) and "=" in item for item in layout)):
        raise ConfigError(f"{where}: external.layout must be a list of data.KEY=VALUE strings")
    return ExternalSet(name=str(body.get("name") or Path(body["root"]).name), root=body["root"],
                       data_format=body["data_format"], class_map=class_map, layout=layout, source=str(path))
