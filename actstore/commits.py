"""Commit records: which shards are visible, and their statistics.

Each writer (a rank) owns one record, the attributes of the zarr group ``commits/writer-<id>``.
A record is cumulative: the ranges of shards that writer committed, and the per-hook running
sums over exactly those shards. Committing a shard is one atomic rewrite of the writer's record
(a rename locally, a single PUT on object stores), made after all of the shard's data is
stored, so a crash leaves the shard either fully visible or invisible. Several writers never
touch each other's records, and readers take the union of all records.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .errors import StoreFormatError
from .layout import COMMITS, commit_path, group_doc
from .remote import Location, storage_call
from .stats import RunningStats

log = logging.getLogger(__name__)

RECORD_ATTR = "actstore_commit"


@dataclass
class CommitRecord:
    """One writer's committed shards and the statistics over them."""

    writer_id: str
    shards: set[int] = field(default_factory=set)
    stats: dict[str, RunningStats] = field(default_factory=dict)

    def with_shard(self, shard: int, shard_stats: dict[str, RunningStats]) -> CommitRecord:
        """A new record with ``shard`` added (self is left unchanged until the write succeeds)."""
        stats = dict(self.stats)
        for hook, s in shard_stats.items():
            stats[hook] = stats[hook].merged(s) if hook in stats else s
        return CommitRecord(self.writer_id, self.shards | {shard}, stats)

    def to_json(self) -> dict[str, Any]:
        return {
            "writer_id": self.writer_id,
            "shard_ranges": shards_to_ranges(self.shards),
            "stats": {hook: s.to_json() for hook, s in self.stats.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommitRecord:
        return cls(
            writer_id=str(data["writer_id"]),
            shards=ranges_to_shards(data["shard_ranges"]),
            stats={hook: RunningStats.from_json(s) for hook, s in data["stats"].items()},
        )


def shards_to_ranges(shards: set[int]) -> list[list[int]]:
    """Sorted half-open ``[start, stop)`` runs: compact for millions of shards."""
    out: list[list[int]] = []
    for s in sorted(shards):
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return out


def ranges_to_shards(ranges: list[list[int]]) -> set[int]:
    return {s for a, b in ranges for s in range(a, b)}


def write_record(loc: Location, record: CommitRecord) -> None:
    """Atomically replace ``record``'s zarr group metadata (the commit point)."""
    doc = group_doc({RECORD_ATTR: record.to_json()})
    loc.write_bytes_atomic(f"{commit_path(record.writer_id)}/zarr.json", json.dumps(doc).encode())


def load_records(loc: Location) -> list[CommitRecord]:
    """Every writer's record, read fresh (listing caches are dropped first)."""
    base = loc.path(COMMITS)
    loc.fs.invalidate_cache(base)
    try:
        entries = storage_call(lambda: loc.fs.ls(base, detail=False), loc.url)
    except FileNotFoundError:
        return []
    records = []
    for entry in sorted(entries):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("writer-"):
            continue
        try:
            doc = loc.read_json(f"{COMMITS}/{name}/zarr.json")
        except FileNotFoundError:
            continue  # a writer created its folder but never committed
        try:
            records.append(CommitRecord.from_json(doc["attributes"][RECORD_ATTR]))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreFormatError(f"commit record {COMMITS}/{name} is malformed: {e}") from e
    return records


@dataclass(frozen=True)
class CommitState:
    """The union of all records: what readers may see."""

    shards: frozenset[int]
    stats: dict[str, RunningStats]


def merge_records(records: list[CommitRecord]) -> CommitState:
    shards: set[int] = set()
    stats: dict[str, RunningStats] = {}
    for rec in records:
        overlap = shards & rec.shards
        if overlap:
            raise StoreFormatError(
                f"shards {sorted(overlap)[:5]} are committed by more than one writer "
                f"(writer {rec.writer_id} among them); each writer must own disjoint shards"
            )
        shards |= rec.shards
        for hook, s in rec.stats.items():
            stats[hook] = stats[hook].merged(s) if hook in stats else s
    return CommitState(frozenset(shards), stats)
