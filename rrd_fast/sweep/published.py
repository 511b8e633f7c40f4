"""Published results that a sweep's report compares against, read from a data file.

The bundled file (`published_cifar100.json`) holds the RRD paper's two CIFAR-100 tables as
printed, one row per method and one column per teacher/student pair, and says where each
row comes from; a sweep names it with `published: cifar100` or gives the path of another
file in the same format. Its optional `transfer` section holds the transfer table (linear
probes on STL-10 and Tiny-ImageNet), per pair, row (teacher, student, method) and data set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rrd_fast.config import ConfigError

FORMAT = "rrd-fast-published/1"
BUNDLED = {"cifar100": Path(__file__).with_name("published_cifar100.json")}


@dataclass(frozen=True)
class Published:
    """One published number and where it comes from."""

    top1: float
    source: str  # a key of the file's `sources`
    note: str = ""


class PublishedTable:
    """Lookups by pair name (`<teacher>_<student>`) and our method names."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.path = path
        self.data = data
        self.sources: dict[str, str] = dict(data.get("sources", {}))
        self._cells: dict[tuple[str, str], Published] = {}
        self._teacher: dict[str, Published] = {}
        self._student: dict[str, Published] = {}
        base = data.get("baselines", {})
        for t, table in enumerate(data.get("tables", [])):
            pairs = table["pairs"]
            for key, values in [("teacher", table["teacher"]), ("student", table["student"]), *table["rows"].items()]:
                if len(values) != len(pairs):
                    raise ConfigError(f"{path}: tables[{t}] row {key!r} has {len(values)} values for {len(pairs)} pairs")
            for i, pair in enumerate(pairs):
                self._teacher[pair] = Published(float(table["teacher"][i]), base.get("teacher", {}).get("source", ""))
                self._student[pair] = Published(float(table["student"][i]), base.get("student", {}).get("source", ""))
                for method, values in table["rows"].items():
                    if values[i] is not None:
                        source = data.get("methods", {}).get(method, {}).get("source", "")
                        self._cells[(pair, method)] = Published(float(values[i]), source)
        self._transfer: dict[tuple[str, str, str], Published] = {}
        transfer = data.get("transfer")
        if transfer:
            known = list(transfer["datasets"])
            for pair, entry in transfer["pairs"].items():
                rows = [("teacher", entry.get("teacher", {})), ("student", entry.get("student", {})),
                        *entry.get("rows", {}).items()]
                for row, values in rows:
                    for dataset, value in values.items():
                        if dataset not in known:
                            raise ConfigError(f"{path}: transfer.pairs.{pair}: row {row!r} names data set {dataset!r}, "
                                              f"not one of transfer.datasets {known}")
                        if value is not None:
                            self._transfer[(pair, row, dataset)] = Published(float(value), str(transfer["source"]))
        for note in data.get("notes", []):
            self._cells.setdefault((note["pair"], note["method"]),
                                   Published(float(note["top1"]), note["source"], note.get("text", "")))

    @property
    def pairs(self) -> list[str]:
        return list(self._teacher)

    def method(self, pair: str, method: str) -> Published | None:
        return self._cells.get((pair, method))

    def teacher(self, pair: str) -> Published | None:
        return self._teacher.get(pair)

    def student(self, pair: str) -> Published | None:
        return self._student.get(pair)

    def transfer(self, pair: str, row: str, dataset: str) -> Published | None:
        """A transfer-table cell; `row` is "teacher", "student" or a method name."""
        return self._transfer.get((pair, row, dataset))

    def transfer_info(self) -> dict[str, Any] | None:
        """The transfer section's description (about, source, metric, bn, pairs), or None."""
        transfer = self.data.get("transfer")
        if not transfer:
            return None
        return {"about": transfer.get("about", ""), "source": transfer.get("source", ""),
                "metric": transfer.get("metric", ""), "bn": transfer.get("bn"), "pairs": sorted(transfer["pairs"])}

    def arches(self, pair: str) -> tuple[str, str] | None:
        entry = self.data.get("arches", {}).get(pair)
        return (entry["teacher"], entry["student"]) if entry else None

    def source_text(self, key: str) -> str:
        return self.sources.get(key, key)


def resolve_published(name: str) -> Path:
    """A bundled table's file (`cifar100`) or the given path."""
    return BUNDLED[name] if name in BUNDLED else Path(name)


def load_published(name: str) -> PublishedTable:
    """Read and check a published-results file; a bad one is a one-line ConfigError naming it."""
    path = resolve_published(name)
    if not path.is_file():
        known = ", ".join(sorted(BUNDLED))
        raise ConfigError(f"published: {name!r} is neither a bundled table ({known}) nor a file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path}: expected a JSON object with format {FORMAT!r}")
    try:
        return PublishedTable(data, path)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: malformed published table ({type(exc).__name__}: {exc})") from None
