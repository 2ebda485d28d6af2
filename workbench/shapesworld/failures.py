"""Where a model goes wrong: the records of ``evaluate`` broken down by what the caption asked and what was read.

One object: the all-attributes score per stated shape, size and position, and the shape confusion (stated shape →
shape read off the largest object, "none" when no object was found). Two objects: every failing image gets the
first reason that applies, in this order — background, missing object (fewer than two objects), extra object (more
than two), colour missing (a stated colour is absent: typically one object took the other's colour), shape wrong
(both colours present, a shape not as stated: typically the shapes were swapped or merged), relation wrong.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from workbench.shapesworld.world import POSITIONS, SHAPES, parse_caption
from workbench.viz import markdown_rows

TWO_OBJECT_REASONS: tuple[str, ...] = (
    "background",
    "missing object",
    "extra object",
    "colour missing",
    "shape wrong",
    "relation wrong",
)


def _rate(records: Sequence[Mapping[str, Any]]) -> tuple[float, int]:
    return (sum(r["scores"]["all"] for r in records) / len(records) if records else 0.0), len(records)


def _group(records: Sequence[Mapping[str, Any]], key: str) -> dict[str, tuple[float, int]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        value = parse_caption(record["caption"])[key]
        groups.setdefault(value if value is not None else "unstated", []).append(record)
    return {name: _rate(members) for name, members in groups.items()}


def two_object_reason(record: Mapping[str, Any]) -> str | None:
    """Why a two-object record failed (see the module docstring), or None when it is fully correct."""
    if record["scores"]["all"]:
        return None
    attributes = parse_caption(record["caption"])
    objects = record["objects"]
    if not record["scores"]["background"]:
        return "background"
    if len(objects) < 2:
        return "missing object"
    if len(objects) > 2:
        return "extra object"
    colours = {obj["colour"] for obj in objects}
    if attributes["colour_a"] not in colours or attributes["colour_b"] not in colours:
        return "colour missing"
    if not (record["scores"]["object_a"] and record["scores"]["object_b"]):
        return "shape wrong"
    return "relation wrong"


def breakdown(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{"one": {"by_shape"|"by_size"|"by_position": {value: (all-correct fraction, n)}, "shape_confusion": {stated:
    {read: count}}}, "two": {"reasons": {reason: count}, "n": int}} for ``evaluate``'s records (those that carry
    ``objects``)."""
    one = [r for r in records if r["kind"] == "one"]
    two = [r for r in records if r["kind"] == "two"]
    confusion: dict[str, Counter] = {shape: Counter() for shape in SHAPES}
    for record in one:
        read = record["objects"][0]["shape"] if record["objects"] else "none"
        confusion[parse_caption(record["caption"])["shape"]][read] += 1
    reasons = Counter(two_object_reason(r) for r in two)
    return {
        "one": {
            "by_shape": _group(one, "shape"),
            "by_size": _group(one, "size"),
            "by_position": _group(one, "position"),
            "shape_confusion": {shape: dict(counts) for shape, counts in confusion.items() if counts},
        },
        "two": {"reasons": {reason: reasons.get(reason, 0) for reason in TWO_OBJECT_REASONS}, "n": len(two)},
    }


def _rates_table(title: str, rates: Mapping[str, tuple[float, int]], order: Sequence[str]) -> str:
    names = [name for name in order if name in rates]
    cells = [f"{100 * rates[name][0]:.1f}% ({rates[name][1]})" for name in names]
    return markdown_rows([title, *names], [["all correct (n)", *cells]])


def format_breakdown(records: Sequence[Mapping[str, Any]]) -> str:
    """:func:`breakdown` as markdown tables, separated by blank lines."""
    result = breakdown(records)
    tables: list[str] = []
    one = result["one"]
    if any(one["by_shape"]):
        tables.append(_rates_table("one object: shape", one["by_shape"], SHAPES))
        tables.append(_rates_table("one object: size", one["by_size"], ("small", "large", "unstated")))
        tables.append(_rates_table("one object: position", one["by_position"], tuple(POSITIONS)))
        read_shapes = [*SHAPES, "none"]
        rows = []
        for stated, counts in one["shape_confusion"].items():
            total = sum(counts.values())
            rows.append([f"{stated} ({total})", *(f"{100 * counts.get(read, 0) / total:.1f}%" for read in read_shapes)])
        tables.append(markdown_rows(["stated shape → read as", *read_shapes], rows))
    two = result["two"]
    if two["n"]:
        failed = sum(two["reasons"].values())
        rows = [[reason, count, f"{100 * count / two['n']:.1f}%"] for reason, count in two["reasons"].items()]
        rows.append(["(any)", failed, f"{100 * failed / two['n']:.1f}%"])
        tables.append(markdown_rows(["two objects: first failure", "images", "share of the two-object images"], rows))
    return "\n\n".join(tables)
