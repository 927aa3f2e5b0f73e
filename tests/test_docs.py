"""The documentation: the MkDocs site builds with --strict, every relative link of README.md and docs/ resolves,
every command in the README's code blocks parses with the entry point's own argument parser, and the metric
definitions the code writes next to each report are the ones docs/metrics.md shows."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"```bash\n(.*?)```", re.S)


def broken_links(markdown: Path) -> list[str]:
    """Relative link targets of one Markdown file (images included) that name no existing file or folder."""
    text = re.sub(r"```.*?```", "", markdown.read_text(encoding="utf-8"), flags=re.S)   # code is not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue                                  # http(s)://, mailto:, or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (markdown.parent / path).exists():
            broken.append(target)
    return broken


def test_the_link_checker_finds_a_broken_link(tmp_path: Path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok too](there.md#a) [web](https://example.org) [self](#top)\n"
                    "![gone](images/missing.png) [gone](docs/nothing.md#x)\n```bash\n[not a link](nope.md)\n```\n")
    assert broken_links(page) == ["images/missing.png", "docs/nothing.md#x"]


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(REPO).as_posix()
                                                       for p in (REPO / "docs").glob("*.md"))])
def test_relative_links_resolve(page: str):
    assert broken_links(REPO / page) == [], f"{page} links to files that do not exist"


def test_mkdocs_site_builds_strictly(tmp_path: Path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -r requirements.txt installs it)")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                           "-d", str(site)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "index.html").is_file() and (site / "metrics" / "index.html").is_file()


def test_every_docs_page_is_in_the_site_navigation():
    import yaml

    def pages(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [p for value in node.values() for p in pages(value)]
        return [p for item in node for p in pages(item)]

    nav = pages(yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    on_disk = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert sorted(nav) == on_disk, "mkdocs.yml: every docs/*.md page needs a nav entry (and every entry a page)"


def readme_commands() -> list[str]:
    """`python X.py ...` and `python -m module ...` lines of the README's bash blocks (continuations joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("python ") and not line.startswith("python -m pytest"):
                commands.append(line)
    return commands


class Parsed(BaseException):
    """Raised instead of running the entry point once its arguments parsed (BaseException passes run_main)."""


def test_the_readme_has_commands_to_check():
    commands = readme_commands()
    assert "python train.py --config configs/demo.yaml" in commands
    assert "python test.py --checkpoint runs/demo/latest/best.pth" in commands
    assert len(commands) >= 20


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str, monkeypatch: pytest.MonkeyPatch):
    words = shlex.split(command)[1:]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), pytest.raises(Parsed):
        try:
            if words[0] == "-m":
                monkeypatch.setattr(sys, "argv", [words[1], *words[2:]])
                runpy.run_module(words[1], run_name="__main__", alter_sys=True)
            else:
                monkeypatch.setattr(sys, "argv", words)
                runpy.run_path(str(REPO / words[0]), run_name="__main__")
        except SystemExit as exc:
            pytest.fail(f"{command!r} does not parse (exit {exc.code}): {errors.getvalue().strip()}")


def test_docs_show_the_metric_definitions_the_code_writes():
    from evaluation.conventions import CONVENTIONS_MD
    from evaluation.metrics import METRIC_DEFINITIONS_MD

    page = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert METRIC_DEFINITIONS_MD in page, "docs/metrics.md: paste evaluation.metrics.METRIC_DEFINITIONS_MD again"
    assert CONVENTIONS_MD in page, "docs/metrics.md: paste evaluation.conventions.CONVENTIONS_MD again"
