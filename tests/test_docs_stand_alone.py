"""The project's docs stand alone: nothing in the repository sends a reader to a file it does not contain."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A project document is named either by its docs/ path or by an upper-case name like README.md;
# lower-case bare names like report.md are files the code writes.
_DOC_REF = re.compile(r"(docs/[\w.-]+\.md|\b[A-Z][A-Z_-]+\.md)\b")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [ROOT / p for p in out.splitlines() if p.endswith((".py", ".md", ".toml", ".sh", ".txt", ".cfg"))]


def test_every_markdown_file_named_in_code_or_docs_exists_in_the_repository():
    known = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.md") if ".git" not in p.parts}
    known |= {Path(k).name for k in known if "/" in k and not k.startswith("docs/")}
    missing = []
    for path in _tracked_text_files():
        if not path.is_file():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for name in _DOC_REF.findall(line):
                if name not in known:
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: {name}")
    assert not missing, "references to documents that are not in the repository:\n" + "\n".join(missing)
