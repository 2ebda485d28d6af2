"""How long the two notebooks take to execute, as a user runs them (full sizes, embedded model, default threads).

    python benchmarks/notebook_times.py [--fast] [--threads N] [--top 5] [--json out.json] [NOTEBOOK ...]

Executes each notebook headless with nbclient (this venv's ``python3`` kernel, as ``tests/test_notebooks.py`` does,
but without FAST mode unless ``--fast``) on an in-memory copy (the committed files are not touched) and prints, per
notebook, the total wall time, the kernel's CPU time and the slowest cells (wall time from nbclient's
``record_timing``; CPU time of the kernel process per cell from IPython's pre/post_run_cell events), with the CPU
model name from ``lscpu``, the number of CPUs, torch's thread count and the load average before and after. On a
shared machine the wall time is inflated by other processes; the CPU time is not (much), except that torch's worker
threads spin while they wait for a core: with a load above the number of cores, ``--threads 1`` (``OMP_NUM_THREADS``
in the kernel's environment) is the fairer measurement. NOTEBOOK: paths (default both notebooks in ``notebooks/``;
any copy, e.g. an older version from ``git show``, runs with the checkout as its working directory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = (ROOT / "notebooks" / "flow_trajectories.ipynb", ROOT / "notebooks" / "moe_routing.ipynb")

# Prepended to the in-memory copy: the kernel's process CPU time around every cell, keyed by execution count.
_PROBE = """\
import time as _nbt_time
_nbt_cpu = {}
def _nbt_pre(info):
    _nbt_cpu["_start"] = _nbt_time.process_time()
def _nbt_post(result):
    _nbt_cpu[result.execution_count] = _nbt_time.process_time() - _nbt_cpu.pop("_start", _nbt_time.process_time())
get_ipython().events.register("pre_run_cell", _nbt_pre)
get_ipython().events.register("post_run_cell", _nbt_post)
"""
_REPORT = """\
import json as _nbt_json, torch as _nbt_torch
print("NBT" + _nbt_json.dumps({"cpu": {str(k): v for k, v in _nbt_cpu.items()}, "total_cpu": _nbt_time.process_time(),
                              "threads": _nbt_torch.get_num_threads()}))
"""


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu not available)"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.startswith("%"):
            return line.strip()[:70]
    return ""


def time_notebook(path: Path, fast: bool, timeout: int, threads: int | None = None) -> dict:
    """Execute one notebook; per-cell wall and CPU seconds, totals."""
    notebook = nbformat.read(path, as_version=4)
    cells = [(i, cell) for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    notebook.cells.insert(0, nbformat.v4.new_code_cell(_PROBE))
    notebook.cells.append(nbformat.v4.new_code_cell(_REPORT))
    env = os.environ.copy()
    env["WORKBENCH_NOTEBOOK_FAST"] = "1" if fast else "0"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=True,
        resources={"metadata": {"path": str(ROOT)}},
    )
    old_env = os.environ.copy()
    os.environ.update(env)  # the kernel inherits this process's environment
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except Exception as exc:  # a failed or timed-out cell: report the cells that ran, and the error
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    total = time.perf_counter() - start
    report = {}
    for output in notebook.cells[-1].outputs:
        if output.output_type == "stream" and "NBT" in output.text:
            report = json.loads(output.text.split("NBT", 1)[1])
    rows = []
    for index, cell in cells:
        timing = cell.metadata.get("execution", {})
        if "shell.execute_reply" not in timing:
            continue
        began = datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
        ended = datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
        cpu = report.get("cpu", {}).get(str(cell.execution_count))
        rows.append(
            {
                "cell": index,
                "first_line": _first_line(cell.source),
                "wall_s": (ended - began).total_seconds(),
                "cpu_s": cpu,
            }
        )
    return {
        "notebook": path.name,
        "error": error,
        "total_wall_s": total,
        "cells_wall_s": sum(r["wall_s"] for r in rows),
        "kernel_cpu_s": report.get("total_cpu"),
        "torch_threads": report.get("threads"),
        "cells": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="FAST mode (the test suite's sizes)")
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebook files (default: both notebooks)")
    parser.add_argument("--threads", type=int, help="torch threads in the kernel (OMP_NUM_THREADS; default torch's)")
    parser.add_argument("--top", type=int, default=5, help="how many of the slowest cells to print")
    parser.add_argument("--timeout", type=int, default=1200, help="per-cell timeout in seconds")
    parser.add_argument("--json", type=Path, help="also write every cell's times to this file")
    args = parser.parse_args()

    import torch  # after argparse: --help stays quick

    print(
        f"CPU: {cpu_model()} ({os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads by default)",
        flush=True,
    )
    print(f"mode: {'FAST' if args.fast else 'full'}; load average (1/5/15 min) before: {load_average()}", flush=True)
    results = []
    for path in args.notebooks or NOTEBOOKS:
        result = time_notebook(path, args.fast, args.timeout, args.threads)
        results.append(result)
        cpu = "?" if result["kernel_cpu_s"] is None else f"{result['kernel_cpu_s']:.1f}"
        wall = f"{result['total_wall_s']:.1f} s wall (cells {result['cells_wall_s']:.1f} s)"
        print(
            f"\n{result['notebook']}: {wall}, kernel CPU {cpu} s, {result['torch_threads']} torch threads; "
            f"load average after: {load_average()}",
            flush=True,
        )
        if result["error"]:
            print(f"  FAILED: {result['error']}")
        print(f"  slowest {args.top} cells:")
        for row in sorted(result["cells"], key=lambda r: -r["wall_s"])[: args.top]:
            cell_cpu = "" if row["cpu_s"] is None else f", CPU {row['cpu_s']:6.1f} s"
            print(f"    cell {row['cell']:2d}: {row['wall_s']:6.1f} s wall{cell_cpu}  {row['first_line']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "results": results}, indent=1))
    return 1 if any(result["error"] for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
