"""The project speaks to its users about what it does, not about when or in which work session something was
done (history lives in git: commits and dates are fine). Scans every tracked text file; skipped outside a git
checkout (e.g. the copy a GPU machine gets)."""

import os
import re
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EXTENSIONS = (".md", ".py", ".sh", ".toml", ".txt", ".yml", ".yaml", ".json", ".cfg", ".ini", ".log", ".csv")
ORDINALS = "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth"
# A work session named by its place in time or its number; "test session" and pytest's scope="session" are not.
SESSION_TALK = re.compile(
    rf"\b(?:{ORDINALS}|this|last|previous|next|earlier|later)\s+session\b"
    r"|\bthe\s+session's\b"
    r"|(?<![a-z])session\s*[-_#]?\s*\d"
    rf"|\b(?:\d+|two|three|four|five|six|seven|eight|nine|ten|several|many|all|previous|earlier|past|later|"
    rf"{ORDINALS})\s+sessions\b"
    r"|\bsessions?\s+(?:start|end)\b",
    re.IGNORECASE,
)


def _tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.split("\0") if p.endswith(EXTENSIONS) and os.path.isfile(os.path.join(ROOT, p))]


def test_the_pattern_catches_session_talk_and_nothing_else():
    # (the phrases are assembled here so that this file does not itself speak of sessions)
    s = "session"
    for bad in (f"the seventh {s}'s diagnostic", f"measured this {s}", f"since the fourth {s}",
                f"{s.title()} 5 (2026-11-30)", f"{s.title()} 2026-11-29 (2)", f"over seven {s}s",
                f"gpu_run_{s}4.log", f"(the {s} start)", f"the previous {s}", f"run in the sixth {s}",
                f"the {s}'s closing A/B"):
        assert SESSION_TALK.search(bad), bad
    for fine in ('@pytest.fixture(scope="session")', "loaded once per test session", "an HTTP session",
                 "requests.Session()", "session = httpx.Client()", "commit b15e915 (2026-11-30)"):
        assert not SESSION_TALK.search(fine), fine


def test_no_tracked_file_speaks_of_sessions():
    hits = []
    for path in _tracked_text_files():
        if path == "tests/test_no_session_talk.py":  # its own examples
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if SESSION_TALK.search(line):
                    hits.append(f"{path}:{n}: {line.strip()[:120]}")
        if SESSION_TALK.search(path):
            hits.append(f"{path}: the file name")
    assert not hits, "say what and which commit, not when:\n" + "\n".join(hits)
