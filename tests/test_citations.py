"""Comments cite what a maintainer can open: a section of docs/loss_reference.md that exists, a file of the
repository that exists, never the developers' private notes ("spec 3.4", DESIGN.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("raypo", "tests", "bench") for p in (ROOT / folder).rglob("*.py")
                 if p.name != "test_citations.py")  # this file spells the forbidden forms out
REFERENCE = ROOT / "docs" / "loss_reference.md"

SECTION_CITATION = re.compile(r"loss_reference\.md §(\d+(?:\.\d+)?)")
# ("the spec" alone is fine: a job spec, a tiny-model spec)
PRIVATE = re.compile(r"\bspec (?:§|\d)|\bspec identity\b|\bspec/|DESIGN\.md|\bseed paper", re.IGNORECASE)
DOC_PATH = re.compile(r"\b(docs/[\w./-]+\.md)\b")


def _sections() -> set[str]:
    """Section numbers: the numbered headings, and the numbered items of a list (``* **10.10 ...``)."""
    text = REFERENCE.read_text()
    return ({m.group(1) for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?) ", text, re.M)}
            | {m.group(1) for m in re.finditer(r"^\* \*\*(\d+\.\d+) ", text, re.M)})


def test_cited_sections_of_the_loss_reference_exist() -> None:
    sections = _sections()
    assert {"2.8", "3.4", "3.5", "4.3", "10.10"} <= sections  # the headings this test reads are numbered
    missing = [f"{p.relative_to(ROOT)}: §{m.group(1)}" for p in SOURCES
               for m in SECTION_CITATION.finditer(p.read_text()) if m.group(1) not in sections]
    assert not missing, "sections docs/loss_reference.md does not have:\n" + "\n".join(missing)


def test_cited_docs_exist() -> None:
    missing = sorted({f"{p.relative_to(ROOT)}: {m.group(1)}" for p in SOURCES
                      for m in DOC_PATH.finditer(p.read_text()) if not (ROOT / m.group(1)).is_file()})
    assert not missing, "citations of files that are not in the repository:\n" + "\n".join(missing)


def test_no_citation_of_private_notes() -> None:
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in SOURCES
             for i, line in enumerate(p.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not found, "citations a maintainer cannot open:\n" + "\n".join(found)


def test_the_private_pattern_catches_the_old_forms() -> None:
    for old in ("see spec 3.4", "(spec §2.8)", "spec identity 15", "DESIGN.md", "spec/losses.md",
                "the seed paper's Appendix D"):
        assert PRIVATE.search(old), old
    assert not PRIVATE.search("LiPO Eq. 8; docs/loss_reference.md §2.8")
