"""The documentation holds together: every relative link of README.md and docs/*.md (images
and #anchors included) reaches a file of this repository, an #anchor names a heading of its
target (GitHub's anchors), no Markdown file points outside the repository, and the README
stays a landing page (docs/ holds the rest)."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import REPO

README_MAX_LINES = 200
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# folders that hold no documentation of the repository: caches, environments, run outputs
SKIPPED_DIRS = {"results", "data", "__pycache__", "node_modules"}

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
# a code span may run over line breaks, not over a blank line
CODE_SPAN = re.compile(r"(`+)((?:(?!`)[^\n]|`(?!\1)|\n(?![ \t]*\n))+?)\1")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^[ \t]{0,3}\[[^\]]+\]:[ \t]*(<[^>]*>|\S+)", re.MULTILINE)
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
MARKDOWN_LINK_TEXT = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


@dataclass(frozen=True)
class Link:
    """A link target as written, and the line of the Markdown file it is on."""

    line: int
    target: str


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker[0] * len(marker)
            elif marker.startswith(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def prose(text: str) -> str:
    """The text with fenced code blocks and code spans blanked, line breaks kept (so that a
    position still tells the line)."""
    lines = text.splitlines()
    kept = dict(prose_lines(text))
    blanked = "\n".join(kept.get(number, "") for number in range(1, len(lines) + 1))
    return CODE_SPAN.sub(lambda m: "code" + "\n" * m.group(0).count("\n"), blanked)


def links(text: str) -> list[Link]:
    """Every link target of a Markdown text: inline links and images (their text may run over
    line breaks), reference definitions and HTML ``href``/``src``, outside code blocks and code
    spans."""
    body = prose(text)
    matches = [*INLINE_LINK.finditer(body), *REFERENCE_DEFINITION.finditer(body), *HTML_LINK.finditer(body)]
    found = [Link(body.count("\n", 0, m.start(1)) + 1, m.group(1).removeprefix("<").removesuffix(">")) for m in matches]
    return sorted(found, key=lambda link: link.line)


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (code spans and links as their text), lowercase,
    every character but letters, marks, digits, connector punctuation (``_``), ``-`` and spaces
    removed, spaces to ``-``."""
    text = MARKDOWN_LINK_TEXT.sub(r"\1", heading).replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings; a repeated heading gets ``-1``, ``-2``, ...
    as on GitHub."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def outside(target: str) -> bool:
    """Whether a link target is an absolute file path or a ``file:`` URL."""
    return target.startswith(("/", "\\")) or bool(WINDOWS_DRIVE.match(target)) or target.lower().startswith("file:")


def problems(markdown: Path, root: Path) -> list[str]:
    """What is wrong with the links of one Markdown file, one line each, naming the file and
    the link; empty when every relative link resolves inside ``root``."""
    root = root.resolve()
    text = markdown.read_text(encoding="utf-8")
    name = markdown.resolve().relative_to(root).as_posix()
    found: list[str] = []
    for link in links(text):
        where = f"{name}:{link.line}: link ({link.target})"
        if outside(link.target):
            found.append(f"{where} is an absolute path outside the repository")
            continue
        if SCHEME.match(link.target):
            continue  # https:, mailto: and the like: not a file of the repository
        path_part, _, anchor = link.target.partition("#")
        target = (markdown.parent / unquote(path_part)).resolve() if path_part else markdown.resolve()
        if not target.is_relative_to(root):
            found.append(f"{where} points outside the repository")
            continue
        if not target.exists():
            found.append(f"{where}: {target.relative_to(root).as_posix()} does not exist")
            continue
        if anchor:
            if target.suffix.lower() != ".md" or not target.is_file():
                found.append(f"{where}: #{anchor} points into {target.relative_to(root).as_posix()}, which has no headings")
            elif unquote(anchor).lower() not in anchors(target.read_text(encoding="utf-8")):
                found.append(f"{where}: no heading of {target.relative_to(root).as_posix()} has the anchor #{anchor}")
    return found


def markdown_files(root: Path) -> list[Path]:
    """Every Markdown file of the repository, without hidden folders, environments and run outputs."""
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
        files += [Path(folder) / n for n in sorted(names) if n.lower().endswith(".md")]
    return files


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(doc: Path) -> None:
    found = problems(doc, REPO)
    assert not found, "broken links:\n" + "\n".join(found)


def test_no_markdown_file_links_outside_the_repository() -> None:
    files = markdown_files(REPO)
    assert REPO / "README.md" in files
    escaping = [p for doc in files for p in problems(doc, REPO) if "outside the repository" in p]
    assert not escaping, "\n".join(escaping)


def test_the_readme_is_a_landing_page() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/"


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("3. Training: gradient-norm (double-backprop) regularization, or adversarial training",
         "3-training-gradient-norm-double-backprop-regularization-or-adversarial-training"),
        ("`snakemake --lint`", "snakemake---lint"),
        ("`train.penalty_gradient`", "trainpenalty_gradient"),
        ("Are the attacks tight on CIFAR-10?", "are-the-attacks-tight-on-cifar-10"),
        ("What moves between runs: the across-model correlation", "what-moves-between-runs-the-across-model-correlation"),
        ("Median ρ̃ and α", "median-ρ̃-and-α"),
        ("See [the spec](spec.md)", "see-the-spec"),
    ],
)
def test_anchors_are_githubs(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_the_check_catches_each_kind_of_broken_link(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Same\n\n## Same\n\ntext\n", encoding="utf-8")
    (tmp_path / "img.png").write_bytes(b"")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#same-1) ![ok](img.png) [ok](#top) [web](https://example.org/x.md)\n"
        "[missing](docs/b.md)\n"
        "![missing image](figures/x.png)\n"
        "[bad anchor](docs/a.md#nowhere)\n"
        "[bad local anchor](#nowhere)\n"
        "[escapes](../shared/data)\n"
        "[absolute](/etc/passwd)\n"
        "[file url](file:///tmp/x)\n"
        "[ref]: docs/c.md\n"
        "[a link over\ntwo lines](docs/d.md)\n"
        "`[in code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    found = problems(readme, tmp_path)
    assert all(p.startswith("README.md:") for p in found), found
    assert [p.split(": link ", 1)[1].split(")", 1)[0] for p in found] == [
        "(docs/b.md",
        "(figures/x.png",
        "(docs/a.md#nowhere",
        "(#nowhere",
        "(../shared/data",
        "(/etc/passwd",
        "(file:///tmp/x",
        "(docs/c.md",
        "(docs/d.md",
    ], found
    assert found[-1].startswith("README.md:13: "), found
