"""The reference log-prob cache for DPO: one pass with adapters disabled, kept on disk, reused by every run
on the same (model, data, lengths).

An entry holds, for each split, a (N, 4) float32 table indexed by the pair's position in its split:
summed log-probs of the chosen and rejected answers and their token counts. The per-token mean that
IPO uses is sum / count, so one entry serves sum and mean losses alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from alignment.data import TokenizedPair, pair_length
from alignment.files import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COLUMNS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")
Tables = dict[str, Tensor]  # split -> (N, 4) float32, rows in the order of COLUMNS


def default_cache_dir() -> Path:
    from alignment.model import cache_dir

    return cache_dir() / "reference"


# ---- the fingerprint ---------------------------------------------------------------------------------------------


_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


def weights_identity(source: str, revision: str | None) -> str:
    """What names the base's weights: the commit of a hub snapshot, else a hash of the local files' content."""
    match = _SNAPSHOT.search(Path(source).as_posix())
    if match:
        return f"hub-commit:{match.group(1)}"
    path = Path(source)
    if not path.is_dir():  # a hub name while the hub is reachable: the revision pins it, or "main" moves
        return f"hub:{source}@{revision or 'main'}"
    # hashing GBs of weights on every run would cost seconds: remember each file's hash per (path, size, mtime)
    memo = default_cache_dir() / "file-hashes.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    digest, before = hashlib.sha256(), len(known)
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in known:
            known[key] = _file_sha256(file)
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(known[key].encode())
    if len(known) != before:
        try:
            atomic_write(memo, lambda handle: handle.write(json.dumps(known).encode()))
        except OSError:  # a read-only cache only costs the hashes next time
            pass
    return f"sha256:{digest.hexdigest()}"


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---- the file ----------------------------------------------------------------------------------------------------


def _checksum(tables: Tables) -> str:
    digest = hashlib.sha256()
    for split in sorted(tables):
        digest.update(split.encode())
        digest.update(tables[split].contiguous().numpy().tobytes())
    return digest.hexdigest()


class ReferenceCache:
    """Entries `<directory>/<fingerprint>.pt`, written atomically and checked on every read."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def load(self, key: str, sizes: dict[str, int]) -> Tables | None:
        """The entry's tables, or None (with the reason in the log) when it is missing, unreadable or does not
        match: a file is never trusted only because it is there."""
        path = self.path(key)
        if not path.exists():
            log.info("reference log-probs: no cache entry %s; computing them", path)
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            tables = entry["tables"]
            problem = self._problem(entry, key, sizes)
        except Exception as err:  # truncated or not a torch file at all
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem:
            log.warning("reference log-probs: cache entry %s is %s; computing them afresh", path, problem)
            return None
        log.info("reference log-probs: loaded from %s; no reference forward in this run", path)
        return tables

    @staticmethod
    def _problem(entry: dict, key: str, sizes: dict[str, int]) -> str | None:
        tables = entry["tables"]
        if entry.get("version") != FORMAT_VERSION or entry.get("fingerprint") != key:
            return "for another model, data or format"
        if {s: t.shape for s, t in tables.items()} != {s: (n, len(COLUMNS)) for s, n in sizes.items()}:
            return "of the wrong size"
        if entry.get("checksum") != _checksum(tables):
            return "corrupt (checksum mismatch)"
        if not all(torch.isfinite(t).all() for t in tables.values()):
            return "corrupt (non-finite values)"
        return None

    def save(self, key: str, tables: Tables, meta: dict) -> Path:
        tables = {s: t.to(torch.float32).contiguous() for s, t in tables.items()}
        entry = {"version": FORMAT_VERSION, "fingerprint": key, "meta": meta, "tables": tables,
                 "checksum": _checksum(tables)}  # fmt: skip
        path = self.path(key)
        atomic_write(path, lambda handle: torch.save(entry, handle))
        log.info("reference log-probs: written to %s", path)
        return path


# ---- computing -------------------------------------------------------------------------------------------------


def length_sorted_shards(pairs: Sequence[TokenizedPair], rank: int, world: int) -> list[int]:
    """This process's share of the positions, longest first: similar lengths share a batch (little padding) and
    every process gets a similar load."""
    by_length = sorted(range(len(pairs)), key=lambda i: -pair_length(pairs[i]))
    return by_length[rank::world]


def compute_tables(
    pairs: Sequence[TokenizedPair],
    positions: Iterable[int],
    logps_fn: Callable[[list[TokenizedPair]], tuple[Tensor, Tensor, Tensor, Tensor]],
    batch_size: int,
    *,
    desc: str,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """(positions (M,), table (M, 4)) for the pairs at `positions`, `batch_size` pairs per forward.

    `logps_fn` maps a list of pairs to their (chosen sums, rejected sums, chosen counts, rejected counts).
    """
    positions = list(positions)
    rows = []
    batches = range(0, len(positions), batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        batch = [pairs[i] for i in positions[start : start + batch_size]]
        rows.append(torch.stack([t.float().cpu() for t in logps_fn(batch)], dim=1))
    table = torch.cat(rows) if rows else torch.zeros(0, len(COLUMNS))
    return torch.tensor(positions, dtype=torch.long), table


def reference_tables(
    trainer,
    splits: dict[str, Sequence[TokenizedPair]],
    logps_fn: Callable[[list[TokenizedPair]], tuple[Tensor, Tensor, Tensor, Tensor]],
    *,
    identity: dict,
    digests: dict[str, str],
    cache_dir: str | Path | None,
    batch_size: int,
) -> Tables:
    """The reference tables of every split: from the cache when a valid entry matches, else computed.

    The entry's key is `identity` (model and numerics) with `digests`, the splits' token-id hashes
    (`pairs_digest`). Under DDP the global-zero process reads the entry and broadcasts it, so the nodes need not
    share a file system. On a miss each process computes a length-sorted share, the shares are gathered on every
    process, and the global-zero process writes the entry while the others wait at a barrier.
    """
    strategy, rank, world = trainer.strategy, trainer.global_rank, trainer.world_size
    key = fingerprint({**identity, "format": FORMAT_VERSION, "pairs": digests})
    cache = ReferenceCache(cache_dir)
    tables = cache.load(key, {s: len(p) for s, p in splits.items()}) if trainer.is_global_zero else None
    tables = strategy.broadcast(tables, src=0)
    if tables is not None:
        return tables
    tables = {}
    for split, pairs in splits.items():
        share = compute_tables(
            pairs, length_sorted_shards(pairs, rank, world), logps_fn, batch_size,
            desc=f"reference log-probs ({split})", progress=trainer.is_global_zero,
        )  # fmt: skip
        shares = [share]
        if world > 1:
            shares = [None] * world
            torch.distributed.all_gather_object(shares, share)
        table = torch.full((len(pairs), len(COLUMNS)), float("nan"))
        for positions, rows in shares:
            table[positions] = rows
        tables[split] = table
    if trainer.is_global_zero:
        try:
            cache.save(key, tables, meta=identity)
        except OSError as err:  # the run goes on with the tables in memory; the next run computes them again
            log.warning("reference log-probs: cannot write the cache entry in %s: %s", cache.directory, err)
    strategy.barrier("reference-cache")
    return tables
