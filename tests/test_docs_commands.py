"""Every command the README and the docs show exists: each ``prr ...`` line of a ```bash / ```sh / ```console
block in README.md and docs/**/*.md parses with prr's own argument parser (subcommands, options, choices and
types; nothing runs), and every script such a line runs (``bash scripts/X``, ``python3 scripts/X``) is in the
tree. Run in-process, so it takes about a second."""

import glob
import os
import re
import shlex

import pytest

from prr.cli import build_parser

ROOT = os.path.join(os.path.dirname(__file__), "..")
PAGES = sorted(["README.md", *(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                            recursive=True))])
BLOCK = re.compile(r"^```(bash|sh|console)\n(.*?)^```", re.M | re.S)


def _commands(text: str) -> list[str]:
    """The shell commands of the page's bash/sh/console blocks: continuation lines joined, comments dropped,
    ``a && b`` split, a console's ``$ `` prompt removed."""
    out = []
    for _, body in BLOCK.findall(text):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if not line or line.startswith("#"):
                continue
            out += [c.strip() for c in re.split(r"&&|\|\||;|\|", line) if c.strip()]
    return out


def _prr_argv(words: list[str]) -> list[str] | None:
    """The arguments after ``prr`` / ``python -m prr`` / ``torchrun ... -m prr``, or None if not a prr command."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:1] == ["prr"]:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "prr":
            return words[i + 2:]
    return None


def _script(words: list[str]) -> str | None:
    """The path of a script the command runs from the tree (scripts/..., tests/...), if any."""
    for w in words:
        if re.fullmatch(r"(scripts|tests)/\S+\.(py|sh)", w):
            return w
    return None


CASES = [(page, cmd) for page in PAGES for cmd in _commands(open(os.path.join(ROOT, page), encoding="utf-8").read())]


def test_the_pages_show_commands():
    pages = {p for p, c in CASES if _prr_argv(shlex.split(c, comments=True)) is not None}
    assert "README.md" in pages and len(pages) >= 5, pages


@pytest.mark.parametrize(("page", "cmd"), CASES, ids=[f"{p}: {c[:60]}" for p, c in CASES])
def test_shown_command_exists(page, cmd, capsys):
    words = shlex.split(cmd, comments=True)
    script = _script(words)
    if script is not None:
        assert os.path.exists(os.path.join(ROOT, script)), f"{page} runs {script}, which is not in the tree"
    argv = _prr_argv(words)
    if argv is None:
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `{cmd}` does not parse: {capsys.readouterr().err.strip()} (exit {e.code})")


@pytest.mark.parametrize("page", ["README.md", "results/README.md", "scripts/README.md"])
def test_relative_links_of_the_pages_outside_the_docs_site_resolve(page):
    """The docs site's links are checked by `mkdocs build --strict`; these pages are read on the repository."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    missing = []
    for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        if not os.path.exists(os.path.join(ROOT, os.path.dirname(page), target)):
            missing.append(target)
    assert not missing, f"{page} links to missing files: {missing}"
