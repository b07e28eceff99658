"""The one way SACDiff writes an output (a run folder, a results folder, a checkpoint, a mask): all or nothing.

``Output(target, kind, overwrite, inputs)`` checks everything before the work starts — the target does not exist
(or ``overwrite`` and SACDiff wrote it: a folder holding the ``.sacdiff-output`` marker or a run's report, a
SACDiff checkpoint, an image whose header note says SACDiff wrote it), it is none of the inputs and holds none of
them, its folder is writable — and removes the temporary leftovers of dead SACDiff processes. The work is written
under a unique temporary name beside the target (``.NAME.tmp-PID-RANDOM``), then put in place in one step:

- a new target with an exclusive rename (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere an existence check just
  before ``rename``): of two writers one wins and the other gets a clear error, nothing is lost;
- an existing target (``overwrite``) by exchanging the two names atomically (``RENAME_EXCHANGE``), so a reader sees
  the old or the new output whole, never a mix; then the old one is deleted. Only the output that was there when
  the writer started (its inode) may be replaced: when another writer committed meanwhile, this one fails with an
  error and the other's output stays — of two `--overwrite` writers one wins, the other gets an error.

Anything that fails, SIGINT and SIGTERM included (``cli.main`` turns SIGTERM into KeyboardInterrupt), removes the
temporary name. A SIGKILL leaves it; the next SACDiff writer beside it removes it once its process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .errors import SACDiffError

MARKER = ".sacdiff-output"  # in every folder SACDiff writes: {"kind": ...}
IMAGE_NOTE = "written by SACDiff"  # ITK_FileNotes of every image SACDiff writes (NIfTI descrip, NRRD/MHA field)
JSON_NOTE = "SACDiff"  # "written_by" of every stand-alone JSON file SACDiff writes (kind "json")
_TMP = ".tmp-"


def write_json(path: Path, document: dict, allow_nan: bool = False) -> None:
    """The file of an ``Output`` of kind "json": ``document`` marked ``"written_by": JSON_NOTE`` (what lets
    ``--overwrite`` replace it later), indented."""
    path.write_text(json.dumps({"written_by": JSON_NOTE, **document}, indent=1, allow_nan=allow_nan),
                    encoding="utf-8")


def temp_name(target: Path, suffix: str = "") -> Path:
    """A unique temporary name beside ``target`` (``.NAME.tmp-PID-RANDOM``), the form ``clean_stale`` recognises."""
    return target.with_name(f".{target.name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def replaced_file(path) -> Iterator[Path]:
    """A file inside an output SACDiff already owns (a summary, a picture, its own checkpoint re-saved): yields a
    temporary name beside ``path`` in the leftover-cleaning style of ``Output``; renamed over ``path`` when the
    block succeeds, removed when it fails. (New targets beside the user's files go through ``Output``.)"""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def mark(folder: Path, kind: str) -> None:
    """Write the marker that tells a later ``--overwrite`` this folder is SACDiff's own."""
    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")


def _renameat2(src: Path, dst: Path, flag: int) -> Optional[bool]:
    """True when done; False when ``dst`` exists (NOREPLACE); None when the call is unavailable here."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return None
    at_fdcwd = -100
    if call(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), ctypes.c_uint(flag)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        return False
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return None
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (then False). Atomic on Linux."""
    done = _renameat2(src, dst, 1)  # RENAME_NOREPLACE
    if done is not None:
        return done
    if dst.exists():
        return False
    os.rename(src, dst)
    return True


def exchange(a: Path, b: Path) -> None:
    """Swap two existing paths, atomically where the system allows (Linux RENAME_EXCHANGE)."""
    if _renameat2(a, b, 2):
        return
    aside = temp_name(b)
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def clean_stale(target: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` beside ``target`` whose process is gone (a SIGKILL'd SACDiff), and the image
    writer's inner temporary of such a name (``..NAME.tmp-PID-*``, ``io.write_image``)."""
    removed = []
    prefixes = (f".{target.name}{_TMP}", f"..{target.name}{_TMP}")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            remove(entry)
            removed.append(entry)
    return removed


def written_by_sacdiff(path: Path, kind: str) -> bool:
    """Whether ``path`` is an output SACDiff wrote (and so may be replaced with ``--overwrite``)."""
    if path.is_symlink():
        return False
    if path.is_dir():
        if (path / MARKER).is_file():
            return True
        report = path / "report.json"  # run folders written before the marker existed
        try:
            return kind == "run" and "sacdiff_report_version" in json.loads(report.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
    if not path.is_file():
        return False
    if kind == "checkpoint":
        from .checkpoint import read_checkpoint

        try:
            read_checkpoint(path)
            return True
        except SACDiffError:
            return False
    if kind == "lung-model":
        from .lungnet import is_lungnet_file

        return is_lungnet_file(path)
    if kind == "json":
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("written_by") == JSON_NOTE
        except (OSError, ValueError, AttributeError):
            return False
    if kind == "image":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return False
        return reader.HasMetaDataKey("ITK_FileNotes") and IMAGE_NOTE in reader.GetMetaData("ITK_FileNotes")
    return False


def _empty_folder(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _overlaps(target: Path, inputs: Iterable) -> Optional[Path]:
    t = target.resolve()
    for item in inputs:
        if item is None:
            continue
        i = Path(item).resolve()
        if i == t or t in i.parents:
            return Path(item)
    return None


def identity(path: Path) -> Optional[tuple[int, int]]:
    """(device, inode) of ``path`` itself (a symlink not followed), or None when absent: another writer's commit
    (a rename or an exchange) puts a different inode under the name."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Output:
    """One output, written under a temporary name and put in place whole (see the module docstring).

    ``with Output(path, "run", overwrite, inputs=[ct, lung]) as tmp: ...write into tmp...`` — a folder for kinds
    "run" and "results", a file path for "checkpoint", "lung-model", "image" and "json" (a JSON object holding
    ``"written_by": JSON_NOTE``: ``write_json``)."""

    FOLDER_KINDS = ("run", "results")

    def __init__(self, target, kind: str, overwrite: bool = False, inputs: Iterable = (),
                 started_from: Optional[tuple[int, int]] = None):
        self.target = Path(target)
        self.kind = kind
        self.folder = kind in self.FOLDER_KINDS
        self.overwrite = overwrite
        self.tmp: Optional[Path] = None
        self.check(inputs)
        # What this writer may replace: the target as it is now (or as the caller read it: ``started_from``, e.g.
        # the run `threshold` loaded). Another writer's commit in between makes this one fail, never vanish.
        self.started_from = identity(self.target) if started_from is None else started_from

    def check(self, inputs: Iterable = ()) -> None:
        """Everything that can be known before the work: refuses with one line naming the problem and the fix."""
        target = self.target
        clash = _overlaps(target, inputs)
        if clash is not None:
            raise SACDiffError(f"output {target} would replace or hold the input {clash}; choose another --out")
        if _empty_folder(target):
            pass  # nothing to lose: taken over at commit
        elif target.exists() or target.is_symlink():
            if not self.overwrite:
                raise SACDiffError(f"{target} already exists; choose another --out or pass --overwrite")
            if target.is_symlink():
                raise SACDiffError(f"{target} is a symbolic link (to {os.readlink(target)}); SACDiff never replaces a "
                                   "link nor writes through one: give the real path or another --out")
            if self.folder != target.is_dir():
                raise SACDiffError(f"{target} is a {'file' if self.folder else 'folder'}; SACDiff writes a "
                                   f"{'folder' if self.folder else 'file'} there: choose another --out")
            if not written_by_sacdiff(target, self.kind):
                raise SACDiffError(f"{target} was not written by SACDiff; --overwrite replaces only SACDiff's own "
                                   "outputs: choose another --out (or remove it yourself)")
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            probe = parent / f".{target.name}{_TMP}{os.getpid()}-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SACDiffError(f"cannot write in {parent} ({exc.strerror or exc}); choose a writable --out") from None
        clean_stale(target)

    def __enter__(self) -> Path:
        suffix = "" if self.folder else "".join(self.target.suffixes)  # writers choose the format by the suffix
        self.tmp = temp_name(self.target, suffix)
        if self.folder:
            self.tmp.mkdir()
            try:
                mark(self.tmp, self.kind)
            except BaseException:  # __exit__ does not run when __enter__ fails
                remove(self.tmp)
                raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.commit()
        finally:
            if self.tmp is not None:
                remove(self.tmp)
        return False

    def commit(self) -> None:
        tmp, target = self.tmp, self.target
        self.committed = identity(tmp)  # the output's identity once in place (a rename keeps the inode)
        try:
            if self.folder and _empty_folder(target):
                try:
                    target.rmdir()
                except OSError:
                    pass
            if rename_noreplace(tmp, target):
                return
            raced = (f"{target} was written by another process while this one worked; its output is kept and this "
                     "one discarded: run again (or use another --out)")
            if not self.overwrite or self.started_from is None or identity(target) != self.started_from:
                raise SACDiffError(raced)
            if not written_by_sacdiff(target, self.kind):
                raise SACDiffError(f"{target} was replaced meanwhile by something SACDiff did not write; left as it is")
            exchange(tmp, target)  # tmp now holds the previous output, removed by __exit__
            if identity(tmp) != self.started_from:  # another writer committed between the check and the exchange
                exchange(tmp, target)  # theirs back in place
                raise SACDiffError(raced)
        except OSError as exc:
            raise SACDiffError(f"cannot write {target} ({exc.strerror or exc}); nothing was changed — free space or "
                               "choose a writable --out") from None
