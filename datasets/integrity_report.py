"""What an integrity check found (`Report`), and the one search for identical decoded pixels that the BRISC
check (datasets/brisc_integrity.py) and the other layouts' check (datasets/layout_integrity.py) share."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Report:
    """Findings grouped by kind: a count and the first few examples of each."""

    examples: int = 5
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    info: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind].append(detail)

    def warn(self, kind: str, detail: str) -> None:
        self.warnings[kind].append(detail)

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        lines = list(self.info)
        for title, group in (("errors", self.errors), ("warnings", self.warnings)):
            total = sum(len(v) for v in group.values())
            lines.append(f"{title}: {total}")
            for kind, details in group.items():
                lines.append(f"  {kind}: {len(details)}")
                lines.extend(f"    {d}" for d in details[: self.examples])
                if len(details) > self.examples:
                    lines.append(f"    ... and {len(details) - self.examples} more")
        lines.append("result: OK" if self.ok else f"result: {sum(len(v) for v in self.errors.values())} error(s)")
        return "\n".join(lines)



def report_identical_content(report: Report, digests: dict[str, dict[str, list[str]]]) -> None:
    """Warn about images with identical decoded pixels within each split and across train and test.
    `digests`: {split: {pixel digest: [image paths]}}."""
    for split, by_digest in digests.items():
        for paths in by_digest.values():
            if len(paths) > 1:
                report.warn(f"duplicate content within {split}", " == ".join(Path(p).name for p in paths[:3]))
    if "train" in digests and "test" in digests:
        shared = sorted(set(digests["train"]) & set(digests["test"]))
        for digest in shared:
            pair = digests["train"][digest][:1] + digests["test"][digest][:1]
            report.warn("same content in train and test", " == ".join(Path(p).name for p in pair))
        report.info.append(f"train/test duplicates (identical decoded pixels): {len(shared)}")
