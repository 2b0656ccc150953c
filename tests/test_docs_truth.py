"""Sentences in the docs and comments that used to go stale, pinned to what they describe: README
quotes no benchmark figure (docs/BENCHMARKS.md has the current ones), OPERATIONS says what
`genq-worker start`'s --loglevel/--mode fall back to, every `celery -A X` names a real app module,
and no comment names a concept by an issue number."""

from __future__ import annotations

import importlib
import re

from tests.helpers import REPO

FIGURE = re.compile(r"\d[\d.,]*\s*(?:tok/s|×|x\b|%)")


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_readme_points_to_the_benchmarks_instead_of_quoting_them() -> None:
    throughput = section((REPO / "README.md").read_text(), "Throughput")
    prose = re.sub(r"```.*?```", "", throughput, flags=re.S)
    assert "docs/BENCHMARKS.md" in prose
    assert FIGURE.findall(prose) == [], "README quotes figures: quote BENCHMARKS' current ones or none"


def test_operations_says_what_start_options_fall_back_to() -> None:
    from worker.main import start

    ops = (REPO / "docs" / "OPERATIONS.md").read_text()
    options = {p.name: p for p in start.params}
    for option, variable, fallback in (("loglevel", "GENQ_LOG_LEVEL", "INFO"), ("mode", "GENQ_MODE", "auto")):
        assert options[option].default is None  # unset: the environment decides
        row = next(line for line in ops.splitlines() if line.startswith(f"| `{variable}` |"))
        assert f"--{option}` overrides it" in row and f"this variable, else `{fallback}`" in row, row


def test_every_celery_app_named_in_code_and_docs_exists() -> None:
    texts = [p.read_text() for p in (REPO / "worker").rglob("*.py")]
    texts += [(REPO / "README.md").read_text(), *(p.read_text() for p in (REPO / "docs").glob("*.md"))]
    named = {m for text in texts for m in re.findall(r"celery -A ([\w.]+)", text)}
    assert named
    for module in named:
        assert getattr(importlib.import_module(module), "app", None) is not None, module


def test_no_comment_names_a_concept_by_issue_number() -> None:
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("worker", "producer", "bench", "scripts")
        for path in (REPO / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bissues? #?\d+", line, re.I)
    ]
    assert found == []
