"""File IO at the boundary: atomic writes (a temporary path beside the target, fsync, rename), reading the files a
user names (text, YAML, JSON) with one-line errors, and content fingerprints."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pluribus.errors import OutputExistsError, PluribusError, cannot_create


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see either the old file or the whole new one."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, with the usual file mode (0666 less the umask).

    A full disk is one PluribusError naming the file; the old file, if any, is left as it was.
    """
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600: a recipe.yaml or manifest.json others on the machine cannot read
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PluribusError(f"cannot write '{path}': {e.strerror or 'no space left on device'}; free space "
                                f"on the disk holding '{path.parent}' and rerun") from None
        raise
    return path


def shown_path(path: str | Path) -> str:
    """A path as a summary prints it, in one form whichever way a stage was given it: relative to the working
    directory where it lies under it, else absolute."""
    here = Path.cwd()
    for p, cwd in ((Path(os.path.abspath(path)), here), (Path(path).resolve(), here.resolve())):
        with contextlib.suppress(ValueError):
            return str(p.relative_to(cwd))
    return os.path.abspath(path)


def ensure_dir(path: str | Path, what: str = "") -> Path:
    """``mkdir -p path``, or one PluribusError naming the part of ``path`` that exists but is not a folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        named = f" ({what})" if what else ""
        raise PluribusError(f"'{blocker}' exists but is not a folder, so '{path}'{named} cannot be created "
                            "there; move it away or choose another location") from None
    return path


def make_dirs(path: str | Path) -> Path:
    """``mkdir -p path``, or one PluribusError naming ``path`` and the system's reason (under a file, read-only,
    a path the system cannot hold such as /proc/x)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # the OS names the part it could not make (a parent, for /proc/runs/x)
        raise PluribusError(cannot_create(e.filename or path, e.strerror or str(e))) from None
    return path


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove temporary folders of ``target`` left by killed writers on this host (their pid is gone).

    A writer killed by SIGKILL (or a power cut) cannot clean up; its ``.NAME.HOST-PID.*.tmp`` folder is removed
    by the next writer of the same target. Folders of live processes, or of other hosts sharing the file
    system, are left alone.
    """
    prefix = f".{target.name}.{socket.gethostname()}-"
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if not (p.name.startswith(prefix) and p.name.endswith(".tmp") and p.is_dir()):
            continue
        pid = p.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target``, on error it is removed.

    Raises OutputExistsError if ``target`` exists and ``overwrite`` is False, before anything is written. The
    temporary folder is named after the host and pid, so a later writer can remove it if this one is killed.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{socket.gethostname()}-{os.getpid()}.", suffix=".tmp",
                                    dir=target.parent))
    except OSError as e:
        # the OS names the temporary folder or one parent; the user named the output
        blocker = next((p for p in target.parents if p.exists()), None)
        reason = f"'{blocker}' is a file, not a folder" if blocker and not blocker.is_dir() else e.strerror or str(e)
        raise PluribusError(cannot_create(target, reason, "output folder")) from None
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the published folder gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


# Files that describe a folder rather than hold its data: left out of its fingerprint, so a rebuilt card or
# manifest over the same data does not make the stages after it stale. (A training record is content: export
# publishes it.)
_NOT_CONTENT = {"README.md", "stats.json", "manifest.json", "recipe.yaml", "devices.json"}  # devices.json: pluribus.device


def content_fingerprint(path: str | Path) -> str | None:
    """A short sha256 of what a file or folder holds (names and bytes of its files, recursively), or None if absent.

    Hidden entries (temporary folders, moved-aside runs), checkpoints and the bookkeeping files above are not
    part of it.
    """
    p = Path(path)
    if not p.exists():
        return None
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and f.name not in _NOT_CONTENT
        and not any(part.startswith(".") or part == "checkpoints" for part in f.relative_to(p).parts))
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(p) if f != p else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- reading


def read_text_file(path: str | Path, what: str = "file", error: type[PluribusError] = PluribusError) -> str:
    """The text of a YAML/JSON/text file the user named, or one ``error`` line: missing, a folder, not UTF-8.

    ``what`` names the file in the message ("recipe file", "eval results").
    """
    p = Path(path)
    if p.is_dir():
        raise error(f"'{p}' is a folder, expected {'an' if what[0] in 'aeiou' else 'a'} {what}")
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} '{p}' does not exist") from None
    except UnicodeDecodeError:
        raise error(f"{what} '{p}' is not UTF-8 text (is it a YAML/JSON file?)") from None
    except OSError as e:
        raise error(f"{what} '{p}' cannot be read ({e.strerror or e})") from None


def read_yaml(path: str | Path, what: str = "YAML file", error: type[PluribusError] = PluribusError) -> Any:
    """The YAML data of ``path`` (``read_text_file``'s errors, and one line naming where the YAML breaks)."""
    import yaml

    text = read_text_file(path, what, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{what} '{Path(path)}' is not valid YAML{where}") from None


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """The JSON data of ``path``; a file that is not JSON is one PluribusError ending in ``fix``."""
    try:
        return json.loads(read_text_file(path, what))
    except json.JSONDecodeError as e:
        raise PluribusError(f"{what} '{path}' is not valid JSON (line {e.lineno}); {fix}") from None


def read_json_object(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """``read_json`` of a file that must hold a JSON object (a config, a record)."""
    data = read_json(path, what, fix)
    if not isinstance(data, dict):
        raise PluribusError(f"{what} '{path}' is not a JSON object; {fix}")
    return data
