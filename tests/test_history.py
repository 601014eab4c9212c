"""The product describes itself as it is now: no development history in code, docs, help texts or file names.
History belongs in git and in CHANGELOG.md (user-visible changes, by version)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
            r"fourteenth|fifteenth|\d+(?:st|nd|rd|th)")
FIRST = ("first", "initial", "original")
WORK_PERIODS = r"(?:work\s+)?(?:session|sprint|iteration|work\s+period|milestone)"
# Each pattern names one way a sentence tells the project's history instead of its behaviour.
HISTORY_PATTERNS = {
    "numbered work period": re.compile(rf"\b(?:{ORDINALS})\s+{WORK_PERIODS}s?\b|\b{WORK_PERIODS}\s+#?\d+\b",
                                       re.IGNORECASE),
    "numbered issue or work item": re.compile(r"\b(?:issue|ticket|work\s+item|task)\s*#?\d+\b|"
                                              r"\bissue'?s\s+(?:target|criteri|limit|figure)", re.IGNORECASE),
    "release by its order": re.compile(rf"\b(?:{'|'.join(FIRST)})\s+release\b", re.IGNORECASE),
}
# Result files named after the period that wrote them (sim_live-s12.json, cloud-s7b.json).
PERIOD_FILE_NAME = re.compile(r"[-_]s\d+[a-z]?(?:[-_.]|$)")
# Files whose job is to hold history, and this file, which has to spell the patterns out.
EXEMPT = {"CHANGELOG.md", "tests/test_history.py"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".proto", ".pyi", ".sh", ".cfg", ".ini", ".json",
                 ".csv", ""}


def history_phrases(text: str) -> list[tuple[str, str]]:
    """(pattern name, matched text) for every phrase in `text` that tells development history."""
    return [(name, m.group(0)) for name, pattern in HISTORY_PATTERNS.items() for m in pattern.finditer(text)]


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_the_patterns_catch_history():
    # Filled in here rather than written out, so that this file tells no history itself.
    caught = [("Fixed in the {} {}: the split.", ("second", "session")), ("as measured in the {} {}", ("12th", "session")),
              ("{} {} closing note", ("Session", 12)), ("{} {}'s criterion holds", ("issue", 7)),
              ("see {} #{}", ("issue", 3)), ("the {}'s targets", ("issue",)), ("work {} {}", ("item", 4)),
              ("The {} {} fused on the 8x8 grid", (FIRST[0], "release"))]
    for template, parts in caught:
        sentence = template.format(*parts)
        assert history_phrases(sentence), sentence
    for sentence in ("a TLS session is resumed", "the first exit answers", "issues are filed on GitHub",
                     "release the lock", "the second exit's confidence"):
        assert not history_phrases(sentence), sentence
    assert PERIOD_FILE_NAME.search("sim_live-s12.json") and PERIOD_FILE_NAME.search("cloud-s7b.json")
    assert not PERIOD_FILE_NAME.search("cloud-split0.json") and not PERIOD_FILE_NAME.search("results.md")


def test_no_history_in_the_tracked_files():
    found = []
    for name in tracked_files():
        if name in EXEMPT:
            continue
        if PERIOD_FILE_NAME.search(Path(name).name):
            found.append(f"{name}: file name tells the work period")
        path = ROOT / name
        if path.suffix not in TEXT_SUFFIXES or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for line_no, line in enumerate(text.splitlines(), 1):
            found += [f"{name}:{line_no}: {kind}: {phrase!r}" for kind, phrase in history_phrases(line)]
    assert not found, "development history in the product (describe what it does now):\n" + "\n".join(found)
