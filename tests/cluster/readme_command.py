"""Print one of the README's set-up commands, so CI and the fresh-machine check run exactly what it says.

The README marks each set-up command with an HTML comment ``<!-- readme-command: NAME -->`` on the line before
its fenced code block; the block holds one command line. Keeping the text in one place (the README) means a
change to the documented command is what CI runs next, with no second copy to drift.

Usage: ``python3 tests/cluster/readme_command.py demo|test`` (stdlib only: it runs before anything is installed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"<!-- readme-command: (?P<name>[\w-]+) -->\s*\n```\w*\n(?P<body>.*?)\n```", re.S)


def readme_commands(text: str) -> dict[str, str]:
    """Map each marked command's name to its command line (the fenced block's non-empty lines, joined)."""
    found: dict[str, str] = {}
    for match in _BLOCK.finditer(text):
        lines = [line.strip() for line in match["body"].splitlines() if line.strip()]
        found[match["name"]] = " ".join(lines)
    return found


def main(argv: list[str]) -> int:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: readme_command.py {{{'|'.join(commands) or 'NAME'}}} (marked in {README})", file=sys.stderr)
        return 2
    print(commands[argv[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
