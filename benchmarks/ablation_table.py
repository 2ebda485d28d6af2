"""One markdown row per arm of benchmarks/shapesworld_ablation.sh: accuracy, binding probe and training speed.

python benchmarks/ablation_table.py OUT_DIR      # reads OUT_DIR/<arm>/{eval.txt,sensitivity.txt,run/…}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from workbench.viz import markdown_rows  # noqa: E402

COLUMNS = (
    "arm",
    "images",
    "img/s",
    "one: shape",
    "one: all",
    "two: object a",
    "two: object b",
    "two: relation",
    "two: all",
    "flip @0.9",
    "flip @0.6",
    "colour swap @0.9",
)


def _eval_rows(text: str) -> dict[str, list[str]]:
    """kind → the cells of the evaluation table's row for that kind."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[1] in ("one", "two"):
            rows[cells[1]] = cells
    return rows


def _sensitivity(text: str, edit: str) -> list[str]:
    for line in text.splitlines():
        if edit in line:
            return [c.strip() for c in line.strip().strip("|").split("|")][2:]
    return ["–", "–", "–"]


def _speed(run: Path) -> tuple[str, str]:
    """Images trained on (the run's last step × its batch size) and images/s over the sessions that logged a
    summary (a run resumed after an interruption logs one per session)."""
    log, meta = run / "transformer_log.jsonl", run / "transformer.json"
    if not log.is_file() or not meta.is_file():
        return "0", "–"
    state = json.loads(meta.read_text())
    images = state["step"] * state["config"]["batch_size"]
    runs = [json.loads(line)["run"] for line in log.read_text().splitlines() if line.startswith('{"run"')]
    seconds = sum(r["seconds"] for r in runs)
    return str(images), (f"{sum(r['images'] for r in runs) / seconds:.1f}" if seconds else "–")


def row(arm_dir: Path) -> list[str]:
    """The table row of one arm's folder."""
    evaluation = (arm_dir / "eval.txt").read_text() if (arm_dir / "eval.txt").is_file() else ""
    sensitivity = (arm_dir / "sensitivity.txt").read_text() if (arm_dir / "sensitivity.txt").is_file() else ""
    rows = _eval_rows(evaluation)
    one = rows.get("one", ["–"] * 13)
    two = rows.get("two", ["–"] * 13)
    flip = _sensitivity(sensitivity, "relation flipped")
    swap = _sensitivity(sensitivity, "colours swapped")
    images, speed = _speed(arm_dir / "run")
    return [arm_dir.name, images, speed, one[5], one[12], two[8], two[9], two[10], two[12], flip[0], flip[1], swap[0]]


def table(out: Path) -> str:
    return markdown_rows(COLUMNS, [row(arm_dir) for arm_dir in sorted(p for p in out.iterdir() if p.is_dir())])


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python benchmarks/ablation_table.py OUT_DIR")
    print(table(Path(sys.argv[1])))
