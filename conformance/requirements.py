"""Read the numbered requirements out of ``spec/*.md``.

A requirement is a level-3 heading whose first word is its ID, followed by a
bullet list of its metadata (spec/README.md describes the format):

    ### NQE-4: Reserved bytes are zero

    - **Level:** MUST
    - **Roles:** codec, coreengine
    - **On failure:** EINVAL
    - **Untestable:** reason        (only when no test can check it)

The conformance report lists every requirement found here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

SPEC_DIR = Path(__file__).resolve().parent.parent / "spec"
HEADING = re.compile(r"^###\s+([A-Z]+-\d+)\s*[:—-]\s*(.+?)\s*$")
META = re.compile(r"^-\s+\*\*([A-Za-z ]+):\*\*\s*(.+?)\s*$")
LEVELS = ("MUST", "MUST NOT", "SHOULD", "SHOULD NOT", "MAY")
ID = re.compile(r"^[A-Z]+-\d+$")


@dataclasses.dataclass(frozen=True)
class Requirement:
    id: str
    title: str
    file: str
    level: str
    roles: tuple[str, ...]
    untestable: str | None


class SpecFormatError(ValueError):
    """A spec file breaks the requirement format (so the report would be wrong)."""


def load(spec_dir: Path = SPEC_DIR) -> dict[str, Requirement]:
    """Every requirement in ``spec_dir``, by ID, in file order. Raises on duplicates."""
    found: dict[str, Requirement] = {}
    for path in sorted(spec_dir.glob("*.md")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = HEADING.match(line)
            if not m:
                continue
            rid, title = m.groups()
            meta: dict[str, str] = {}
            for follow in lines[i + 1:]:
                if follow.startswith("#"):
                    break
                mm = META.match(follow)
                if mm:
                    meta[mm.group(1).strip().lower()] = mm.group(2)
            level = meta.get("level", "")
            if level not in LEVELS:
                raise SpecFormatError(
                    f"{path.name}: {rid} has level {level!r}, not one of {LEVELS}")
            if "roles" not in meta:
                raise SpecFormatError(f"{path.name}: {rid} names no roles")
            if rid in found:
                raise SpecFormatError(f"{path.name}: {rid} is already defined in {found[rid].file}")
            found[rid] = Requirement(
                id=rid, title=title, file=path.name, level=level,
                roles=tuple(r.strip() for r in meta["roles"].split(",") if r.strip()),
                untestable=meta.get("untestable"),
            )
    return found
