"""The run directory: results written as they are made, resumable, never silently overwritten.

Layout (docs/DESIGN.md section 9), per evaluation batch ``k`` (the first at the root, further ones
in ``eval_01/``, ``eval_02/``, ...): ``per_sequence/<part>/eta_<j>.npy``,
``eval_delta_matrix.npy``, ``attributions.npy``; at the root ``summary.json``,
``config.yaml``, ``plots/*.png``, ``update.safetensors``, the rollout files ``rollouts/``,
and ``partial/`` (per-batch results kept for resuming, removed once the run finishes).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from probe.jsonable import dumps

SCHEMA_VERSION = 1

log = logging.getLogger("probe")


class RunDirectoryExists(FileExistsError):
    pass


RUN_MARKER = ".probe-run"  # written into every run directory probe creates; only such a directory is ever deleted
LOCK_FILE = ".probe-lock"  # flock-ed by the process writing the run (RunDirectory.lock)
_HELD_LOCKS: dict[str, int] = {}  # lock file -> descriptor, for the locks this process holds


def default_run_name(name: str = "") -> str:
    """``name``, else ``$PROBE_RUN_NAME`` (set once by the CLI, so every DDP process agrees), else a timestamp."""
    return name or os.environ.get("PROBE_RUN_NAME") or time.strftime("%Y%m%d-%H%M%S")


def check_run_name(name: str) -> str:
    """A run name is one path component: no separator, not ``.`` or ``..``, not absolute, not ``~``-expanded."""
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith("~")
        or os.path.isabs(name)
        or (os.altsep is not None and os.altsep in name)
    )
    if bad:
        raise ValueError(
            f"run name {name!r} is not a single folder name: a run lives in <run.root>/<run.name> and may never "
            "write outside run.root. Fix: give a plain name such as 'step-500' (letters, digits, '-', '_', '.'), "
            "and choose where runs go with run.root"
        )
    return name


def run_path(root: str | os.PathLike, name: str) -> Path:
    """``<root>/<name>`` with ``~`` in ``root`` expanded, after checking that the result lies inside ``root``.

    ``name`` must be a single component (:func:`check_run_name`); ``<root>/<name>`` must not be a symbolic
    link (it could point anywhere). ``root`` itself may be a link: it is the user's choice of where runs go.
    """
    check_run_name(name)
    base = Path(root).expanduser().resolve()
    path = base / name
    if path.is_symlink():
        raise ValueError(
            f"{path} is a symbolic link (to {os.readlink(path)}); probe never writes a run through a link, which "
            "could lead outside run.root. Fix: remove the link or choose another run.name"
        )
    if path.resolve().parent != base:  # cannot happen for a single component; checked all the same
        raise ValueError(f"run directory {path} resolves outside the run root {base}; choose another run.name")
    return path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Atomic strict-JSON write (non-finite floats are written as null, see :mod:`probe.jsonable`)."""
    _atomic_write_bytes(Path(path), dumps(obj, indent=2).encode())


def save_npy(path: Path, array: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, np.asarray(array))
    os.replace(tmp, path)


class RunDirectory:
    """One run's folder. ``open()`` creates it, resumes an unfinished one, or refuses a finished one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ---- life cycle -------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str, name: str = "", overwrite: bool = False, kind: str = "predict") -> "RunDirectory":
        """Create ``<root>/<name>`` (a ``kind`` run), resume it, or refuse it.

        A folder that exists is used only if probe made it for the same kind of run (it holds the
        ``.probe-run`` marker) or it is empty. ``overwrite`` deletes such a run first (finished, or an
        unfinished one's results): nothing else is ever deleted.
        """
        run = cls(run_path(root, default_run_name(name)))
        if run.path.exists():
            run._check_owned(kind)
            earlier = sorted(p.name for p in run.path.iterdir() if p.name not in (RUN_MARKER, LOCK_FILE))
            if kind == "fit" and earlier and not overwrite:
                raise RunDirectoryExists(
                    f"{run.path} holds an earlier fit ({', '.join(earlier[:4])}); a fit never continues into another "
                    "fit's folder, whose history and checkpoints would then mix two runs. Fix: choose another "
                    "run.name, pass run.overwrite=true to replace it, or continue that training under a new run.name "
                    f"with --ckpt_path {run.path / 'checkpoints' / 'last.ckpt'}"
                )
            if kind == "predict" and run.is_finished() and not overwrite:
                raise RunDirectoryExists(
                    f"run directory {run.path} already holds a finished run (summary.json status 'complete'); "
                    "it is never overwritten silently: choose another --run.name, or pass --run.overwrite=true to "
                    "replace it"
                )
            if overwrite:  # a run folder probe made (checked above): finished, or unfinished results discarded
                run.lock()  # refused while another process writes it; kept while the folder is emptied
                for child in run.path.iterdir():
                    if child.name == LOCK_FILE:
                        continue
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        run.path.mkdir(parents=True, exist_ok=True)
        marker = run.path / RUN_MARKER
        if not marker.exists():
            _atomic_write_bytes(
                marker, json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode()
            )
        run.lock()
        return run

    def _check_owned(self, kind: str) -> None:
        """Refuse a folder probe did not make for this kind of run (empty folders are adopted), and one that holds
        a symbolic link anywhere (a link inside a run folder could lead a write, or a deletion, outside the root)."""
        if not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a folder. Fix: choose another run.name")
        for folder, dirs, files in os.walk(self.path):  # os.walk does not follow links
            links = [name for name in dirs + files if os.path.islink(os.path.join(folder, name))]
            if links:
                raise FileExistsError(
                    f"{self.path} holds a symbolic link ({os.path.join(folder, links[0])}); probe never writes into or "
                    "deletes a run folder with links, which could lead outside run.root. Fix: remove the link or "
                    "choose another run.name"
                )
        marker = self.path / RUN_MARKER
        if not marker.is_file():
            if any(self.path.iterdir()):
                raise FileExistsError(
                    f"{self.path} exists and was not made by probe (it has no {RUN_MARKER} marker); probe never writes "
                    "into or deletes a folder it did not create. Fix: choose another run.name (or another run.root)"
                )
            return
        try:
            made_for = json.loads(marker.read_text()).get("kind")
        except (json.JSONDecodeError, OSError, AttributeError):
            made_for = None
        if made_for != kind:
            raise FileExistsError(
                f"{self.path} holds a probe '{made_for}' run, not a '{kind}' run. Fix: choose another run.name"
            )

    # ---- one process at a time ---------------------------------------------------------------
    def lock(self) -> None:
        """Hold ``<run>/.probe-lock`` (``fcntl.flock``) while this process writes the run: a second process that
        opens the same run folder is refused (two runs of one name would mix their batches). The kernel releases
        the lock when the process ends, however it ends, so a crashed run never blocks the next one; the file
        names the holder for the message. Held locks are kept per process (a run resumed in the same process
        reuses its lock) and released by :meth:`unlock`."""
        path = (self.path / LOCK_FILE).resolve()
        if str(path) in _HELD_LOCKS:
            return
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_json(path)
            os.close(fd)
            raise RunDirectoryExists(
                f"{self.path} is being written by another process ({_describe(holder)}); two runs of one name would "
                "mix their results. Fix: wait for that run to end, or choose another run.name"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _HELD_LOCKS[str(path)] = fd

    def unlock(self) -> None:
        """Release this process's lock on the run folder (no-op if it holds none)."""
        fd = _HELD_LOCKS.pop(str((self.path / LOCK_FILE).resolve()), None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def resuming(self) -> bool:
        return (self.path / "partial").exists()

    def is_finished(self) -> bool:
        summary = self.path / "summary.json"
        if not summary.exists():
            return False
        try:
            return json.loads(summary.read_text()).get("status") == "complete"
        except (json.JSONDecodeError, OSError):
            return False

    def finish(self, summary: dict) -> None:
        """Write the final summary (status complete) and drop the resume cache."""
        summary = {"schema_version": SCHEMA_VERSION, **summary, "status": "complete"}
        write_json(self.path / "summary.json", summary)
        shutil.rmtree(self.path / "partial", ignore_errors=True)
        self.unlock()

    # ---- outputs ----------------------------------------------------------------------------
    def eval_dir(self, k: int) -> Path:
        return self.path if k == 0 else self.path / f"eval_{k:02d}"

    # ---- per-batch cache for resuming -------------------------------------------------------
    def has_results(self) -> bool:
        """Whether an unfinished run has computed anything a resume would reuse (a batch of E in ``partial/``)."""
        partial = self.path / "partial"
        return partial.is_dir() and any(partial.rglob("batch_*.npz"))

    def claim(
        self,
        section: str,
        fingerprint: dict[str, Any],
        stale: tuple[str, ...] = (),
        key_name: Callable[[str], str] = str,
    ) -> None:
        """Tie the run's unfinished results to what they depend on (``partial/<section>.json``), so that a resume
        never mixes two runs.

        The first call writes the fingerprint. A later run (a resume) with another fingerprint is refused, naming
        every key that changed (as ``key_name`` spells it), when the folder holds computed results; when it holds
        none (a run that stopped before its first batch of E, e.g. on a setting error), the run starts afresh with
        the new settings: the old fingerprint and the ``stale`` paths of the run folder (e.g. ``rollouts``, copies
        made from the old inputs) are removed and the change is logged. ``stale`` paths without a fingerprint
        (someone deleted ``partial/``) are of unknown origin and removed the same way.
        """
        path = self.path / "partial" / f"{section}.json"
        mine = json.loads(dumps(fingerprint))
        theirs = _read_json(path) if path.is_file() else None
        if theirs == mine:
            return
        leftovers = [name for name in stale if (self.path / name).exists() or (self.path / name).is_symlink()]
        if theirs is None and not leftovers and not self.has_results():
            _atomic_write_bytes(path, dumps(mine, indent=2).encode())  # a new run
            return
        if isinstance(theirs, dict):
            changed = [key_name(k) for k in changed_keys(theirs, mine)]
        else:
            changed = [
                f"unknown: {path} is missing or unreadable, so what made {', '.join(leftovers) or 'them'} is not known"
            ]
        if self.has_results():
            raise ValueError(
                f"{self.path} holds the unfinished results of another run (it differs in: {', '.join(changed)}); "
                "a resume never mixes two runs. Fix: rerun with the settings and inputs of that run, choose another "
                "run.name, or pass run.overwrite=true to discard its unfinished results and start afresh"
            )
        log.warning(
            "%s: restarting an unfinished run that computed nothing yet, with new settings or inputs (changed: %s)",
            self.path,
            ", ".join(changed),
        )
        for name in leftovers:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        _atomic_write_bytes(path, dumps(mine, indent=2).encode())

    @staticmethod
    def batch_key(indices: list[int]) -> str:
        return hashlib.sha1(",".join(map(str, indices)).encode()).hexdigest()[:16]

    def partial_path(self, eval_k: int, indices: list[int]) -> Path:
        return self.path / "partial" / f"eval_{eval_k:02d}" / f"batch_{self.batch_key(indices)}.npz"

    def load_partial(self, eval_k: int, indices: list[int]) -> dict[str, np.ndarray] | None:
        """The cached rows of one batch of E, or None when absent or unreadable (a truncated or empty file, e.g.
        after a power loss: it is logged, removed and the batch recomputed)."""
        path = self.partial_path(eval_k, indices)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            log.warning("%s is unreadable (%s: %s); recomputing that batch", path, type(e).__name__, e)
            path.unlink(missing_ok=True)
            return None

    def save_partial(self, eval_k: int, indices: list[int], arrays: dict[str, np.ndarray]) -> None:
        """Cache one batch's rows: written to a temporary file, flushed to disk, then renamed into place."""
        path = self.partial_path(eval_k, indices)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts (``probe.etas``, ``evals.0.sampling.seed``)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_keys(a, b, name + "."))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(isinstance(x, dict) for x in a):
            for i, (x, y) in enumerate(zip(a, b)):
                if x != y:
                    out.extend(
                        changed_keys(x, y, f"{name}.{i}.")
                        if isinstance(x, dict) and isinstance(y, dict)
                        else [f"{name}.{i}"]
                    )
        elif a != b:
            out.append(name)
    return out


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's content (read in 1 MiB blocks), the identity of an input file in a resume
    fingerprint: a file edited in place under the same name is a different input."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _describe(holder: Any) -> str:
    if not isinstance(holder, dict):
        return "it has not yet said which"
    return f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
