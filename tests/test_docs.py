"""The README and docs an artist or developer reads: the README's first screen, links that resolve,
and every measured number traceable to a committed result file.

Numbers: in README.md and docs/*.md, every decimal number (0.56, 14.12, 1.26x; versions like 0.3.75
and Python 3.10 are not numbers here) must, within its section (heading to heading), appear in a result file that
section cites: a path under quality/report_*/ (a file, or a folder: its .md files), benchmarks/results/
or docs/demo_run.txt. A number matches when a number in the file rounds to it. Setting values that
are the code's own defaults need no citation.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NUMBER = re.compile(r"(?<![\w.])(?<!Python )(\d+\.\d+)(?![\d.]*\.\d)(?![\w])")
CITATION = re.compile(r"(quality/report_\w+(?:/[\w.]+)?|benchmarks/results/[\w.]+|demo_run\.txt)")


def test_readme_first_screen_has_the_picture_install_and_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; keep it for artists (docs/ holds the rest)"
    first = "\n".join(lines[:40])
    assert re.search(r"!\[[^\]]+\]\(docs/[\w.]+\.(png|jpg)\)", first), "a picture of the result"
    assert "ComfyUI-Manager" in first and "git clone" in first, "install via the Manager and by hand"
    assert "bash scripts/demo.sh" in first and "bash scripts/test.sh" in first


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    links = [link for pair in re.findall(r"\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"", text) for link in pair if link]
    return [m for m in links if not re.match(r"[a-z]+:|#", m)]


@pytest.mark.parametrize("doc", [*DOCS, REPO / "quality" / "README.md", REPO / "benchmarks" / "README.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    missing = [m for m in _links(doc) if not (doc.parent / m.split("#")[0]).exists()]
    assert not missing, missing


def _sections(text: str) -> list[str]:
    return re.split(r"\n(?=#{1,4} )", text)


def _numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def _default_values() -> set[float]:
    from apt_core.config import AptConfig

    values: set[float] = set()

    def walk(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v)
            elif isinstance(v, float):
                values.add(v)
            elif isinstance(v, tuple):
                values.update(x for x in v if isinstance(x, float))

    walk(AptConfig())
    return values


def _cited_text(section: str, doc: Path) -> str:
    texts = []
    for ref in set(CITATION.findall(section)):
        path = (REPO / "docs" / ref) if ref == "demo_run.txt" else REPO / ref
        if path.is_dir():
            texts += [p.read_text(encoding="utf-8") for p in sorted(path.glob("*.md"))]
        elif path.is_file() and path.suffix in (".md", ".txt", ".json"):
            texts.append(path.read_text(encoding="utf-8"))
    return "\n".join(texts)


def _matches(number: str, pool: list[float]) -> bool:
    places = len(number.split(".")[1])
    want = float(number)
    return any(abs(round(abs(x), places) - want) < 1e-9 for x in pool)  # NUMBER reads no sign


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_measured_number_comes_from_a_committed_result_file(doc):
    defaults = _default_values()
    problems = []
    for section in _sections(doc.read_text(encoding="utf-8")):
        pool = [float(x) for x in re.findall(r"-?\d+\.\d+|-?\d+", _cited_text(section, doc).replace("−", "-"))]
        for number in _numbers(section):
            if float(number) in defaults or _matches(number, pool):
                continue
            title = section.splitlines()[0][:60]
            problems.append(f"{number} in section {title!r}")
    assert not problems, "numbers without a cited result file that holds them:\n" + "\n".join(problems)
