"""The trajectory store: append-only JSONL shards plus a manifest, resumable and never holding a record twice.

Layout::

    <dir>/manifest.json       {format, config_hash, run_id, key, created, previous_runs}
    <dir>/shard-00000.jsonl   one finished record a line, in the order they were stored
    <dir>/shard-00001.jsonl   (a new shard every ``shard_records`` lines)

Guarantees:

- ``append`` writes whole lines with one ``write``, then flush + fsync, before it returns. A crash (SIGKILL,
  power) can only tear the last line of the last shard; the next writer truncates that partial line (it was
  never acknowledged, so its problem is still pending and gets regenerated).
- Each record's ``key`` field (``problem_id``) is stored at most once: ``append`` refuses a key already stored.
- The manifest's ``config_hash`` must match the run's; a changed config is refused unless ``new_run=True``,
  which moves the old store aside to ``<dir>.prev-<run_id>/`` and starts empty. A store holding no record
  yet takes the new config in place.
- One writer at a time (an flock on ``<dir>/.lock``; the OS releases it when a killed process dies).
- ``datasets.load_dataset("json", data_files=f"{dir}/shard-*.jsonl")`` reads the shards as they are.
- A line that is not a whole record (hand-edited, or valid JSON of something else) is refused naming its
  shard and line; a repeated key (a line copied by hand or a botched merge of shards) counts once and is
  listed in ``duplicates``. ``repair_store`` (``pluribus repair STORE``) moves both kinds of line out of the
  shards into ``removed-<time>.jsonl``, so their problems are generated again on resume.
- A full disk is one PluribusError naming the shard; the partial write is cut off, so the store resumes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from pluribus.errors import PluribusError
from pluribus.io import atomic_write_bytes, atomic_write_text, ensure_dir

logger = logging.getLogger("pluribus.store")
FORMAT = "pluribus-trajectories/1"
SHARD_GLOB = "shard-*.jsonl"
# the manifest fields a store reads back, with the JSON type each must have
_MANIFEST_FIELDS: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("config_hash", "a string", lambda v: isinstance(v, str)),
    ("run_id", "a string", lambda v: isinstance(v, str)),
    ("key", "a string", lambda v: isinstance(v, str)),
    ("created", "a string", lambda v: isinstance(v, str)),
    ("previous_runs", "a list of objects", lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v)),
)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
Check = Callable[[dict[str, Any]], Any]


def repair_hint(directory: Path) -> str:
    return (f"run `pluribus repair {directory}` to move such lines aside (their problems are generated again "
            "on resume), or build from the store as it is with `pluribus build --skip-corrupt`")


class TrajectoryStore:
    """An append-only store of finished records under ``directory``.

    ``config_hash=None`` opens an existing store read-only (for the builders); a hash opens it for writing,
    creating it if needed; ``same_config`` are older hashes of the same config, accepted and replaced.
    ``family`` (a debate of seated experts, stages.debate.seats_family): a store of the same family written with
    another config hash was debated by earlier weights of the same seats; it is moved aside as with ``new_run``.
    ``check(record)`` raises ValueError for a line that parses but is not a record of this store (the debate
    passes ``Trajectory.from_dict``). Raises PluribusError on a config mismatch, a second writer, a missing
    store, or a corrupt line.
    """

    def __init__(self, directory: str | Path, config_hash: str | None = None, new_run: bool = False, *,
                 key: str = "problem_id", shard_records: int = 10_000, same_config: Collection[str] = (),
                 check: Check | None = None, family: str | None = None) -> None:
        self.directory = Path(directory)
        self.key = key
        self.check = check
        self.duplicates: list[str] = []  # "shard:line" of lines repeating a stored key (read once, ignored)
        self.shard_records = shard_records
        self.writable = config_hash is not None
        self._lock_fd: int | None = None
        self._tail: tuple[Path, int] | None = None  # the shard appends go to, and its line count
        manifest_path = self.directory / "manifest.json"
        if not self.writable:
            if not manifest_path.is_file():
                raise PluribusError(f"no trajectory store at '{self.directory}' (no manifest.json); "
                                    "run `pluribus debate RECIPE` first or pass the right folder")
            self.manifest = self._read_manifest()
            self._done = {r[self.key] for r in self.iter_records(skip_corrupt=True)}
            return
        ensure_dir(self.directory, "the trajectory store")
        self._lock()
        if manifest_path.is_file():
            try:
                old = self._read_manifest()
            except PluribusError:
                self._unlock()  # a corrupt store must not stay locked for the rest of the process
                raise
            self._reconcile(old, config_hash, same_config=same_config, family=family, new_run=new_run)
        if not manifest_path.is_file():
            self.manifest = {"format": FORMAT, "config_hash": config_hash, "run_id": uuid.uuid4().hex[:12],
                             "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "previous_runs": getattr(self, "_previous", []),
                             **({"family": family} if family is not None else {})}
            atomic_write_text(manifest_path, json.dumps(self.manifest, indent=2) + "\n")
        else:
            self.manifest = self._read_manifest()
        try:
            self.repaired_lines = self._repair_tail()
            self._done = {r[self.key] for r in self.iter_records()}
        except BaseException:
            self._unlock()
            raise

    def _reconcile(self, old: dict[str, Any], config_hash: str, *, same_config: Collection[str], family: str | None,
                   new_run: bool) -> None:
        """Meet a stored manifest ``old`` written with another config than ``config_hash``: adopt this run's hash
        (an older pluribus's hash of the same config, or a store that holds nothing yet), or move the store aside
        (``new_run``, or the same seated team with retrained experts); else unlock and refuse."""
        manifest_path = self.directory / "manifest.json"
        if old.get("config_hash") in same_config:
            # the same config hashed by an earlier pluribus: adopt this version's hash and resume
            old["config_hash"] = config_hash
            atomic_write_text(manifest_path, json.dumps(old, indent=2) + "\n")
        if old.get("config_hash") != config_hash and not self._holds_records():
            # nothing stored yet (e.g. the first run failed to reach its server): nothing to be
            # inconsistent with, so the store takes this run's config in place, without an archive
            old["config_hash"] = config_hash
            if family is not None:
                old["family"] = family
            atomic_write_text(manifest_path, json.dumps(old, indent=2) + "\n")
        if old.get("config_hash") != config_hash and family is not None and old.get("family") == family:
            # the same team whose seated experts were retrained since: its answers are stale by construction
            logger.warning("store '%s' was debated by earlier weights of its seated experts; moving it aside "
                           "and debating afresh", self.directory)
            new_run = True
        if old.get("config_hash") != config_hash:
            if not new_run:
                self._unlock()
                raise PluribusError(
                    f"store '{self.directory}' was written with config {old.get('config_hash')} but this run's "
                    f"config is {config_hash}; restore the old settings to resume, or pass --new-run to "
                    "move the old store aside and start a new run"
                )
            self._archive(old)

    # ------------------------------------------------------------------------------------------ reading

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def shards(self) -> list[Path]:
        return sorted(self.directory.glob(SHARD_GLOB))

    def done_ids(self) -> set[str]:
        """Keys of every stored record."""
        return set(self._done)

    def __len__(self) -> int:
        return len(self._done)

    def iter_records(self, skip_corrupt: bool = False) -> Iterator[dict[str, Any]]:
        """Every stored record, shard by shard, in storage order, each key once (the first line holding it).

        A line that is not one whole record (torn by a crash, edited by hand, failing ``check``) raises a
        PluribusError naming the file and line, unless ``skip_corrupt``. Lines repeating a key are listed
        in ``self.duplicates``.
        """
        seen: set[Any] = set()
        duplicates = []
        for shard, lineno, _, record, problem in self._lines():
            if problem is not None:
                if skip_corrupt:
                    continue
                raise PluribusError(f"store shard '{shard}' line {lineno} is corrupt ({problem}); "
                                    f"{repair_hint(self.directory)}")
            if record[self.key] in seen:
                duplicates.append(f"{shard.name}:{lineno}")
                continue
            seen.add(record[self.key])
            yield record
        self.duplicates = duplicates

    def _lines(self) -> Iterator[tuple[Path, int, bytes, dict[str, Any] | None, str | None]]:
        """(shard, line number, bytes, record or None, what is wrong with the line or None) of every line."""
        for shard in self.shards():
            with shard.open("rb") as f:
                for lineno, raw in enumerate(f, 1):
                    try:
                        if not raw.endswith(b"\n"):
                            raise ValueError("line has no newline (torn write)")
                        record = json.loads(raw)
                        if not isinstance(record, dict) or self.key not in record:
                            raise ValueError(f"not a record with '{self.key}'")
                        if self.check is not None:
                            self.check(record)
                    except (ValueError, TypeError, KeyError) as e:  # TypeError/KeyError: a check on odd JSON
                        yield shard, lineno, raw, None, str(e)
                        continue
                    yield shard, lineno, raw, record, None

    # ------------------------------------------------------------------------------------------ writing

    def append(self, records: list[dict[str, Any]]) -> int:
        """Store finished records durably (one write, flush, fsync); returns how many were written.

        Raises PluribusError if the store is read-only, or a record's key is already stored or repeated.
        """
        if not self.writable:
            raise PluribusError(f"store '{self.directory}' was opened read-only (no config_hash)")
        if not records:
            return 0
        keys = [r[self.key] for r in records]
        dupes = sorted({k for k in keys if k in self._done} | {k for k in keys if keys.count(k) > 1})
        if dupes:
            raise PluribusError(f"store '{self.directory}' already holds {self.key} {dupes[:5]}; "
                                "a problem is stored exactly once")
        shard = self._current_shard(len(records))
        data = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records).encode()
        with shard.open("ab") as f:
            start = f.tell()
            try:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                # Cut what part of the lines reached the disk: the store then holds whole records only and a
                # rerun resumes with these problems pending, as after a kill. Truncating frees space, so it
                # works on a full disk.
                with contextlib.suppress(OSError):
                    f.truncate(start)
                self._tail = None
                if e.errno in NO_SPACE:
                    raise PluribusError(f"cannot write to '{shard}': {e.strerror or 'no space left on device'}; "
                                        f"free space on the disk holding '{self.directory}', then rerun: "
                                        f"the {len(self._done)} stored problems are kept") from None
                raise PluribusError(f"cannot write to '{shard}': {e.strerror or e}; the {len(self._done)} "
                                    "stored problems are kept, rerun once it is writable") from None
        self._done.update(keys)
        return len(records)

    def close(self) -> None:
        self._unlock()

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- internals

    def _read_manifest(self) -> dict[str, Any]:
        path = self.directory / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise PluribusError(f"store manifest '{path}' is unreadable ({type(e).__name__}); "
                                "restore it or remove the store folder") from None
        if not isinstance(manifest, dict):
            raise PluribusError(f"store manifest '{path}' is not a JSON object (corrupt manifest.json); "
                                "restore it or remove the store folder")
        if manifest.get("format") != FORMAT:
            raise PluribusError(f"'{path}' is not a pluribus trajectory store manifest (format "
                                f"{manifest.get('format')!r}, expected {FORMAT!r})")
        for field, expected, ok in _MANIFEST_FIELDS:
            if field in manifest and not ok(manifest[field]):
                raise PluribusError(f"store manifest '{path}' has {field} = {json.dumps(manifest[field])[:60]}, "
                                    f"expected {expected} (corrupt manifest.json); restore it or remove the store "
                                    "folder")
        return manifest

    def _holds_records(self) -> bool:
        """Whether any shard holds a whole line (a torn first line was never acknowledged: no record)."""
        return any(b"\n" in shard.read_bytes() for shard in self.shards())

    def _lock(self) -> None:
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PluribusError(f"store '{self.directory}' is being written by another process; "
                                "wait for it to finish or stop it") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _archive(self, old: dict[str, Any]) -> None:
        """Move the old run's files to ``<dir>.prev-<run_id>/`` so the new run starts empty."""
        dest = self.directory.with_name(f"{self.directory.name}.prev-{old.get('run_id', 'unknown')}")
        dest.mkdir(parents=True, exist_ok=True)
        for path in [*self.shards(), self.directory / "manifest.json"]:
            os.replace(path, dest / path.name)
        self._previous = [*old.get("previous_runs", []), {"run_id": old.get("run_id"), "moved_to": str(dest)}]

    def _repair_tail(self) -> int:
        """Cut a torn last line (no trailing newline) off the last shard; returns lines removed (0 or 1)."""
        shards = self.shards()
        if not shards:
            return 0
        last = shards[-1]
        data = last.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with last.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return 1

    def _current_shard(self, adding: int) -> Path:
        """The shard to append ``adding`` lines to: the last one while it stays within ``shard_records``."""
        if self._tail is None:
            shards = self.shards()
            if shards:
                with shards[-1].open("rb") as f:
                    self._tail = (shards[-1], sum(1 for _ in f))
            else:
                self._tail = (self.directory / "shard-00000.jsonl", 0)
        path, lines = self._tail
        if lines and lines + adding > self.shard_records:
            path, lines = self.directory / f"shard-{int(path.stem.split('-')[1]) + 1:05d}.jsonl", 0
        self._tail = (path, lines + adding)  # counted before the write: a failed write raises out of append
        return path


# ---------------------------------------------------------------------------------------------- repair


def repair_store(directory: str | Path, *, check: Check | None = None, key: str = "problem_id"
                 ) -> dict[str, Any]:
    """Move every corrupt line, and every line repeating a stored key, out of the shards of ``directory``.

    The lines go, as they were, to ``<dir>/removed-<time>.jsonl`` (outside the shard glob, so no reader sees
    them); each shard is rewritten atomically with the lines it keeps. Their problems are pending again, so
    the next ``pluribus debate`` (or eval) generates them. Takes the writer's lock. Returns
    ``{"corrupt": [...], "duplicates": [...], "moved_to": path or None}`` ("shard:line" each).
    """
    store = TrajectoryStore(directory)  # checks that it is a store (manifest)
    store.check, store.key = check, key
    fd = os.open(store.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PluribusError(f"store '{store.directory}' is being written by another process; "
                                "wait for it to finish or stop it") from None
        corrupt, duplicates, removed = [], [], []
        keep: dict[Path, list[bytes]] = {shard: [] for shard in store.shards()}
        seen: set[Any] = set()
        for shard, lineno, raw, record, problem in store._lines():
            if problem is None and record[key] not in seen:
                seen.add(record[key])
                keep[shard].append(raw)
                continue
            (corrupt if problem is not None else duplicates).append(f"{shard.name}:{lineno}")
            removed.append(raw if raw.endswith(b"\n") else raw + b"\n")
        moved_to = None
        if removed:
            moved_to = store.directory / f"removed-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
            atomic_write_bytes(moved_to, b"".join(removed))  # first: a crash now loses no line
            for shard, lines in keep.items():
                atomic_write_bytes(shard, b"".join(lines))
        return {"corrupt": corrupt, "duplicates": duplicates, "moved_to": moved_to}
    finally:
        os.close(fd)

