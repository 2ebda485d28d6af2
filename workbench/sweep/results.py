"""The results table of a sweep: ``results.jsonl`` and the per-process parts merged into it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

RESULTS_NAME = "results.jsonl"
PART_PATTERN = "results.part-*.jsonl"


# ---------------------------------------------------------------------------------------------------- result table


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a truncated last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows


def merge_results(output_dir: Path, order: Sequence[str] = ()) -> list[dict]:
    """Fold every ``results.part-*.jsonl`` into ``results.jsonl`` (one row per id, the newest wins, ids in
    ``order`` first, in that order), replace it atomically and delete the parts. Returns the merged rows."""
    parts = sorted(output_dir.glob(PART_PATTERN))
    rows = {r["id"]: r for r in read_rows(output_dir / RESULTS_NAME)}
    for part in parts:
        rows.update({r["id"]: r for r in read_rows(part)})
    rank = {cid: i for i, cid in enumerate(order)}
    merged = sorted(rows.values(), key=lambda r: rank.get(r["id"], len(rank)))
    if parts or not (output_dir / RESULTS_NAME).exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        temporary = output_dir / f".{RESULTS_NAME}.tmp"
        temporary.write_text("".join(json.dumps(r) + "\n" for r in merged))
        os.replace(temporary, output_dir / RESULTS_NAME)
        for part in parts:
            part.unlink()
    return merged


def count_part_rows(output_dir: Path) -> int:
    return sum(part.read_text().count("\n") for part in output_dir.glob(PART_PATTERN))
