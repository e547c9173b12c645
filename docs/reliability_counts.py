"""Regenerate the test-count table of ``docs/reliability.md`` from a real run, never by hand.

    python docs/reliability_counts.py           # runs the reliability suites (about a minute), rewrites the table
    python docs/reliability_counts.py --check   # collect only (seconds): exit 1 when the table's counts are stale

The table sits between the two ``<!-- reliability-counts -->`` markers of the page.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reliability.md"
FILES = ("tests/test_stateful.py", "tests/test_fuzz_bytes.py", "tests/test_stress.py", "tests/test_validation.py")
BEGIN, END = "<!-- reliability-counts: begin -->", "<!-- reliability-counts: end -->"
_OUTCOMES = ("passed", "failed", "xfailed", "xpassed", "skipped", "errors", "error", "deselected")


def _pytest(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                       capture_output=True, text=True)
    return r.stdout


def collected() -> dict[str, int]:
    """Tests per file that run by default (not ``slow``), from ``pytest --collect-only``."""
    counts = Counter(line.split("::")[0] for line in _pytest("--collect-only", "-q", *FILES).splitlines()
                     if "::" in line)
    return {f: counts.get(f, 0) for f in FILES}


def run_one(path: str) -> tuple[str, str]:
    summary = [ln for ln in _pytest("-q", path).splitlines() if re.search(r"\d+ \w+.* in [\d.]+s", ln)]
    last = summary[-1] if summary else "no summary line"
    parts = [f"{n} {w}" for n, w in re.findall(r"(\d+) (\w+)", last) if w in _OUTCOMES]
    secs = re.search(r"in ([\d.]+)s", last)
    return ", ".join(parts), f"{float(secs.group(1)):.0f} s" if secs else "?"


def table(rows) -> str:
    lines = ["| file | tests (default run) | outcome | wall time |", "| --- | --- | --- | --- |"]
    lines += [f"| `{f}` | {n} | {outcome} | {t} |" for f, n, outcome, t in rows]
    return "\n".join(lines)


def read_table() -> dict[str, int]:
    text = PAGE.read_text(encoding="utf-8")
    body = text[text.index(BEGIN) : text.index(END)]
    return {f: int(n) for f, n in re.findall(r"^\| `([^`]+)` \| (\d+) \|", body, re.M)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare the table's test counts with the suite")
    args = ap.parse_args(argv)
    counts = collected()
    if args.check:
        listed = read_table()
        stale = {f: (listed.get(f), n) for f, n in counts.items() if listed.get(f) != n}
        if stale:
            print(f"docs/reliability.md is stale (file: (table, suite)): {stale}; "
                  "run python docs/reliability_counts.py")
            return 1
        return 0
    rows = [(f, counts[f], *run_one(f)) for f in FILES]
    text = PAGE.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    PAGE.write_text(head + BEGIN + "\n" + table(rows) + "\n" + END + rest.split(END, 1)[1], encoding="utf-8")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
