"""The reference log-prob cache for DPO: one pass with adapters disabled, kept on disk, reused by every run
on the same (model, data, lengths).

An entry holds, for each split, a (N, 4) float32 table indexed by the pair's position in its split:
summed log-probs of the chosen and rejected answers and their token counts. The per-token mean that
IPO uses is sum / count, so one entry serves sum and mean losses alike.
KTO's entries hold, in the same columns, each example's completion and its mismatched KL completion (another
example's answer to its prompt).

An entry may be partial: its `filled` mask (N,) per split says which rows hold values (the others are NaN). A
short run (`--trainer.max_steps 2`) computes only the pairs its steps read, a longer run adds the rows it lacks,
and a pass stopped by a signal keeps the rows it had computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from alignment.data import TokenizedPair, pair_length
from alignment.files import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: complete tables, no mask (still read)
COLUMNS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")
Tables = dict[str, Tensor]  # split -> (N, 4) float32, rows in the order of COLUMNS; NaN rows not computed yet
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ReferencePassStopped(Exception):
    """A signal stopped the reference pass; the rows computed so far are in the cache."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(signal_name)
        self.signal_name, self.exit_code = signal_name, exit_code


def filled(table: Tensor) -> Tensor:
    """(N,) bool: the rows that hold values."""
    return ~torch.isnan(table).any(dim=1)


def default_cache_dir() -> Path:
    from alignment.files import cache_dir

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
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    digest = hashlib.sha256()
    for file, file_hash in zip(files, _file_hashes(files), strict=True):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file_hash.encode())
    return f"sha256:{digest.hexdigest()}"


def adapter_identity(weights: Path, config: dict) -> dict:
    """What names a starting adapter, DPO's reference then: its weights file's hash, and the settings that scale
    the update it adds (LoRA's alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    scaling = {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora")}
    return {"weights": f"sha256:{_file_hashes([weights])[0]}", **scaling}


def _file_hashes(files: list[Path]) -> list[str]:
    """The sha256 of each file. Hashing GBs of weights on every run would cost seconds: each file's hash is
    remembered per (path, size, mtime)."""
    memo = default_cache_dir() / "file-hashes.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    before, hashes = len(known), []
    for file in files:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in known:
            known[key] = _file_sha256(file)
        hashes.append(known[key])
    if len(known) != before:
        try:
            atomic_write(memo, lambda handle: handle.write(json.dumps(known).encode()))
        except OSError:  # a read-only cache only costs the hashes next time
            pass
    return hashes


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---- the file ----------------------------------------------------------------------------------------------------


def _checksum(tables: Tables, masks: dict[str, Tensor] | None = None) -> str:
    digest = hashlib.sha256()
    for split in sorted(tables):
        digest.update(split.encode())
        digest.update(tables[split].contiguous().numpy().tobytes())
        if masks is not None:
            digest.update(masks[split].to(torch.uint8).contiguous().numpy().tobytes())
    return digest.hexdigest()


class ReferenceCache:
    """Entries `<directory>/<fingerprint>.pt`, written atomically and checked on every read."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def load(self, key: str, sizes: dict[str, int], *, quiet: bool = False) -> Tables | None:
        """The entry's tables (NaN in the rows it does not hold), or None (with the reason in the log) when it is
        missing, unreadable or does not match: a file is never trusted only because it is there."""
        path = self.path(key)
        if not path.exists():
            if not quiet:
                log.info("reference log-probs: no cache entry %s; computing them", path)
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            problem = self._problem(entry, key, sizes)
        except Exception as err:  # truncated or not a torch file at all
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem:
            log.warning("reference log-probs: cache entry %s is %s; computing them afresh", path, problem)
            return None
        tables = entry["tables"]
        if entry["version"] >= 2:  # rows outside the mask are not values
            tables = {s: t.masked_fill(~entry["filled"][s].unsqueeze(1), float("nan")) for s, t in tables.items()}
        return tables

    @staticmethod
    def _problem(entry: dict, key: str, sizes: dict[str, int]) -> str | None:
        tables = entry["tables"]
        if entry.get("version") not in (1, FORMAT_VERSION) or entry.get("fingerprint") != key:
            return "for another model, data or format"
        if {s: t.shape for s, t in tables.items()} != {s: (n, len(COLUMNS)) for s, n in sizes.items()}:
            return "of the wrong size"
        masks = entry.get("filled") if entry["version"] >= 2 else None
        if masks is not None and {s: m.shape for s, m in masks.items()} != {s: (n,) for s, n in sizes.items()}:
            return "of the wrong size"
        if entry.get("checksum") != _checksum(tables, masks):
            return "corrupt (checksum mismatch)"
        masks = masks or {s: torch.ones(n, dtype=torch.bool) for s, n in sizes.items()}  # the first format: whole
        if not all(torch.isfinite(t[masks[s]]).all() for s, t in tables.items()):
            return "corrupt (non-finite values)"
        return None

    def save(self, key: str, tables: Tables, meta: dict) -> Path:
        """Write the filled rows of `tables`, with those of the entry on disk (another run's) that they lack."""
        tables = {s: t.to(torch.float32).contiguous() for s, t in tables.items()}
        before = self.load(key, {s: len(t) for s, t in tables.items()}, quiet=True)
        if before is not None:  # rows already there stay as they are: every run reads the same values
            tables = {s: torch.where(filled(before[s]).unsqueeze(1), before[s], t) for s, t in tables.items()}
        masks = {s: filled(t) for s, t in tables.items()}
        tables = {s: t.nan_to_num(0.0) for s, t in tables.items()}  # the mask says which rows are values
        entry = {"version": FORMAT_VERSION, "fingerprint": key, "meta": meta, "tables": tables, "filled": masks,
                 "checksum": _checksum(tables, masks)}  # fmt: skip
        path = self.path(key)
        atomic_write(path, lambda handle: torch.save(entry, handle))
        done = sum(int(m.sum()) for m in masks.values())
        log.info("reference log-probs: %d of %d rows written to %s", done, sum(len(m) for m in masks.values()), path)
        return path


# ---- which pairs a run reads ---------------------------------------------------------------------------------


def pairs_read_by_steps(
    global_batches: Callable[[int], list[list[int]]],
    size: int,
    *,
    max_steps: int,
    max_epochs: int | None,
    accumulate: int,
    batches_per_epoch: int,
) -> list[int] | None:
    """The positions of the pairs the first `max_steps` optimizer steps read, in the order first read; None when
    they read half the pairs or more (a full pass then costs little more and serves later runs whole).

    `global_batches(epoch)` is the training sampler's batches of that epoch, all processes together; Lightning
    steps the optimizer every `accumulate` batches and at the end of an epoch of `batches_per_epoch` batches.
    """
    if max_steps < 0:
        return None
    seen: dict[int, None] = {}
    steps, epoch = 0, 0
    while steps < max_steps and (max_epochs is None or max_epochs < 0 or epoch < max_epochs):
        batches = global_batches(epoch)[:batches_per_epoch]
        for start in range(0, len(batches), accumulate):
            if steps == max_steps:
                break
            seen.update(dict.fromkeys(i for batch in batches[start : start + accumulate] for i in batch))
            steps += 1
        if 2 * len(seen) >= size or not batches:
            return None
        epoch += 1
    return list(seen)


def train_pairs_read(trainer, sampler) -> list[int] | None:
    """Positions of the training pairs the trainer's steps will read from `sampler` (PairBatchSampler, whose order
    depends on its seed and the epoch only); None when that is half of them or more."""

    def global_batches(epoch: int) -> list[list[int]]:
        sampler.set_epoch(epoch)
        return sampler.global_batches()

    limit = trainer.limit_train_batches  # as Lightning reads it: a count, or a share of the epoch
    per_epoch = len(sampler) if limit is None else min(len(sampler), limit) if isinstance(limit, int) \
        else max(1, int(len(sampler) * limit))  # fmt: skip
    return pairs_read_by_steps(global_batches, len(sampler.lengths), max_steps=trainer.max_steps,
                               max_epochs=trainer.max_epochs, accumulate=trainer.accumulate_grad_batches,
                               batches_per_epoch=per_epoch)  # fmt: skip


# ---- computing -------------------------------------------------------------------------------------------------


@contextmanager
def stop_on_signal() -> Iterator[Callable[[], str | None]]:
    """While inside: SIGTERM or SIGINT is recorded instead of ending the process (a second one ends it: Ctrl-C
    twice); yields a function giving the recorded signal's name, or None."""
    received: list[str] = []

    def record(signum: int, frame) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
        log.warning("%s: saving the reference log-probs computed so far, then stopping", received[0])

    if threading.current_thread() is not threading.main_thread():  # Python lets the main thread alone set them
        yield lambda: None
        return
    handlers = {sig: signal.signal(sig, record) for sig in STOP_SIGNALS}
    try:
        yield lambda: received[0] if received else None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def length_sorted_shards(pairs: Sequence[TokenizedPair], rank: int, world: int, positions=None) -> list[int]:
    """This process's share of the positions (all by default), longest first: similar lengths share a batch
    (little padding) and every process gets a similar load."""
    positions = range(len(pairs)) if positions is None else positions
    by_length = sorted(positions, key=lambda i: -pair_length(pairs[i]))
    return by_length[rank::world]


def compute_tables(
    pairs: Sequence[TokenizedPair],
    positions: Iterable[int],
    logps_fn: Callable[[list[TokenizedPair]], tuple[Tensor, Tensor, Tensor, Tensor]],
    batch_size: int,
    *,
    desc: str,
    progress: bool = True,
    batches: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    in_step: bool = False,
) -> tuple[Tensor, Tensor]:
    """(positions (M,), table (M, 4)) for the pairs at `positions`, `batch_size` pairs per forward.

    `logps_fn` maps a list of pairs to their (chosen sums, rejected sums, chosen counts, rejected counts).
    `should_stop` is asked after every batch (`batches` rounds in all, to keep processes in step, some of them
    empty); when it says so, the rows computed so far are returned. With `in_step` (a base sharded across the
    processes: each forward gathers its layers from all of them), an empty round runs a forward too, and drops it.
    """
    positions = list(positions)
    rounds = -(-len(positions) // batch_size) if batches is None else batches
    rows = []
    for start in tqdm(range(0, rounds * batch_size, batch_size), desc=desc, unit="batch", disable=not progress,
                      dynamic_ncols=True):  # fmt: skip
        batch = [pairs[i] for i in positions[start : start + batch_size]]
        if batch:
            rows.append(torch.stack([t.float().cpu() for t in logps_fn(batch)], dim=1))
        elif in_step:
            logps_fn([pairs[positions[0] if positions else 0]])
        if should_stop():
            break
    table = torch.cat(rows) if rows else torch.zeros(0, len(COLUMNS))
    return torch.tensor(positions[: len(table)], dtype=torch.long), table


def reference_tables(
    trainer,
    splits: dict[str, Sequence[TokenizedPair]],
    logps_fn: Callable[[list[TokenizedPair]], tuple[Tensor, Tensor, Tensor, Tensor]],
    *,
    identity: dict,
    digests: dict[str, str],
    cache_dir: str | Path | None,
    batch_size: int,
    needed: dict[str, list[int] | None] | None = None,
) -> tuple[str, Tables]:
    """(the entry's key, the reference tables of every split): the rows the cache holds, and the `needed` ones
    (positions per split; None or absent: all) it lacks computed and added to it. Rows neither hold are NaN.

    The entry's key is `identity` (model and numerics) with `digests`, the splits' token-id hashes
    (`pairs_digest`). Under DDP the global-zero process reads the entry and broadcasts it, so the nodes need not
    share a file system. Each process computes a length-sorted share of the missing rows, the shares are gathered
    on every process, and the global-zero process writes the entry while the others wait at a barrier.
    A SIGTERM or SIGINT during the pass (to any process) writes the rows computed so far and raises
    ReferencePassStopped on every process.
    """
    needed = needed or {}
    strategy = trainer.strategy
    key = fingerprint({**identity, "format": FORMAT_VERSION, "pairs": digests})
    cache = ReferenceCache(cache_dir)
    tables = _read_entry(cache, key, identity, digests, splits) if trainer.is_global_zero else None
    tables = strategy.broadcast(tables, src=0)
    missing = {}
    for split, pairs in splits.items():
        wanted = range(len(pairs)) if needed.get(split) is None else needed[split]
        held = filled(tables[split]).tolist() if tables is not None else [False] * len(pairs)
        missing[split] = [i for i in wanted if not held[i]]
    tables = tables or {s: torch.full((len(p), len(COLUMNS)), float("nan")) for s, p in splits.items()}
    if not any(missing.values()):
        log.info("reference log-probs: the rows this run needs are in the cache; no reference pass")
        return key, tables
    stopped = _fill(trainer, splits, missing, tables, logps_fn, batch_size)
    if trainer.is_global_zero:
        try:
            cache.save(key, tables, meta=identity)
        except OSError as err:  # the run goes on with the tables in memory; the next run computes them again
            log.warning("reference log-probs: cannot write the cache entry in %s: %s", cache.directory, err)
    strategy.barrier("reference-cache")
    if stopped:
        raise ReferencePassStopped(stopped, 128 + signal.Signals[stopped].value)
    return key, tables


def _read_entry(cache: ReferenceCache, key: str, identity: dict, digests: dict, splits: dict) -> Tables | None:
    sizes = {s: len(p) for s, p in splits.items()}
    old = fingerprint({**identity, "format": 1, "pairs": digests})  # an entry of the first format: complete
    tables = cache.load(key, sizes, quiet=cache.path(old).exists())
    if tables is None and cache.path(old).exists():
        tables = cache.load(old, sizes)
    if tables is not None:
        done, total = sum(int(filled(t).sum()) for t in tables.values()), sum(sizes.values())
        log.info("reference log-probs: %d of %d rows loaded from %s", done, total, cache.directory)
    return tables


def _fill(trainer, splits, missing: dict[str, list[int]], tables: Tables, logps_fn, batch_size: int) -> str | None:
    """Compute the `missing` rows into `tables` (in place) in shares; returns the name of a signal that stopped
    the pass (SIGTERM when it reached another process), else None."""
    strategy, rank, world = trainer.strategy, trainer.global_rank, trainer.world_size
    stops: list[bool] = []

    def should_stop() -> bool:  # every process asks after each batch; a signal to any one stops them all
        stop = received() is not None
        stops.append(strategy.reduce_boolean_decision(stop, all=False) if world > 1 else stop)
        return stops[-1]

    with stop_on_signal() as received:
        for split, pairs in splits.items():
            if not missing[split] or any(stops):
                continue
            largest_share = -(-len(missing[split]) // world)
            share = compute_tables(
                pairs, length_sorted_shards(pairs, rank, world, missing[split]), logps_fn, batch_size,
                desc=f"reference log-probs ({split})", progress=trainer.is_global_zero,
                batches=-(-largest_share // batch_size), should_stop=should_stop,
                in_step=getattr(strategy, "forwards_in_step", False),
            )  # fmt: skip
            shares = [share]
            if world > 1:
                shares = [None] * world
                torch.distributed.all_gather_object(shares, share)
            for positions, rows in shares:
                tables[split][positions] = rows
        return (received() or "SIGTERM") if any(stops) else None


def save_added_rows(trainer, cache: ReferenceCache, key: str, tables: Tables, added: dict[str, Tensor], meta: dict):
    """Write rows computed after the pass (`added`: positions per split, their values in `tables`) into the entry:
    gathered from every process (each computed those of its own batches), written by the global-zero one."""
    shares = [{s: (p, tables[s][p]) for s, p in added.items()}]
    if trainer.world_size > 1:
        shares = [None] * trainer.world_size
        torch.distributed.all_gather_object(shares, {s: (p, tables[s][p]) for s, p in added.items()})
        for share in shares:
            for split, (positions, rows) in share.items():
                tables[split][positions] = rows
    if trainer.is_global_zero and any(shares):
        try:
            cache.save(key, tables, meta=meta)
        except OSError as err:  # the next run computes them again
            log.warning("reference log-probs: cannot write the cache entry in %s: %s", cache.directory, err)
