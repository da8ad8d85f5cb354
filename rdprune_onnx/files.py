"""The one place that owns every file the tool writes.

Rules, whatever the writer (model, external data, report, curves, plot, cache):

- A target is refused when it is an input of the run (by resolved path, and by device and
  inode, so a hard link to an input is refused too), when another output of the same run
  already claimed it, or when it exists but is not a regular file (a device, a FIFO, a
  folder, a socket): ``force`` or not. An existing regular file is refused without
  ``force``.
- Targets are checked before any work (folder present and writable, name not too long,
  suffix) by :meth:`RunFiles.claim`.
- Content is written into a staging folder beside the target (``.rdprune-<pid>-XXXX``,
  files created with the user's umask) and published in one step. Without ``force`` the
  publish cannot replace a file that appeared after the check: it is a hard link (which
  fails on an existing name) then an unlink of the staged name, or ``renameat2`` with
  ``RENAME_NOREPLACE`` where hard links are not supported. With ``force`` it is a rename,
  after checking again that the target is still a regular file and not an input.
- Staging folders left by killed runs are removed when their owner process is gone (the
  pid is in the folder's name; only our own prefix, only folders we own).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rdprune_onnx.errors import UserError

log = logging.getLogger(__name__)

STAGING_PREFIX = ".rdprune-"
FORCE_HINT = "pass --force (force=True in Python) to replace it"


@dataclass(frozen=True)
class Identity:
    path: Path  # resolved
    inode: tuple[int, int] | None  # (st_dev, st_ino) when the file exists
    label: str


def identity(path: str | os.PathLike[str], label: str) -> Identity:
    p = Path(path)
    resolved = p.resolve()
    try:
        st = os.stat(resolved)
        inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return Identity(resolved, inode, label)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def same(target: Identity, other: Identity) -> bool:
    return target.path == other.path or (target.inode is not None and target.inode == other.inode)


@dataclass
class RunFiles:
    """The inputs and outputs of one run: every output target is checked against all.

    ``force`` allows replacing an existing regular file that is neither an input nor
    another output of the run; nothing else.
    """

    force: bool = False
    force_hint: str = FORCE_HINT
    inputs: list[Identity] = field(default_factory=list)
    outputs: list[Identity] = field(default_factory=list)

    def add_input(self, path: str | os.PathLike[str] | None, label: str) -> None:
        """Record a file the run reads; no output may ever land on it."""
        if path is None:
            return
        ident = identity(path, label)
        self.inputs.append(ident)
        for out in self.outputs:
            if same(out, ident):
                raise UserError(
                    f"refusing to overwrite the {label} {str(path)!r} with the {out.label}",
                    f"choose another {out.label} path",
                )

    def add_inputs(self, paths: Iterable[str | os.PathLike[str]], label: str) -> None:
        for path in paths:
            self.add_input(path, label)

    def claim(
        self,
        path: str | os.PathLike[str],
        label: str,
        *,
        suffixes: Sequence[str] | None = None,
    ) -> Path:
        """Check one output target now (before any work) and reserve it for this run."""
        out = Path(path)
        if not out.name or out.name in (".", ".."):
            raise UserError(f"the {label} path {str(out)!r} names no file", "name a file")
        folder = out.parent
        if not folder.is_dir():
            raise UserError(
                f"{label} folder {str(folder)!r} does not exist", "create it or choose another path"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(
                f"{label} folder {str(folder)!r} is not writable", "choose another path"
            )
        limit = _name_max(folder)
        # The staged copy's name carries no prefix, but the target's own name must fit.
        if len(os.fsencode(out.name)) > limit:
            raise UserError(
                f"the {label} name {out.name[:40]!r}... is longer than {limit} bytes",
                "choose a shorter name",
            )
        ident = identity(out, label)
        for other in self.inputs:
            if same(ident, other):
                raise UserError(
                    f"refusing to overwrite the {other.label} {str(out)!r} with the {label}",
                    f"choose another {label} path",
                )
        for other in self.outputs:
            if same(ident, other):
                raise UserError(
                    f"the {label} and the {other.label} are the same file {str(out)!r}",
                    "give each output its own path",
                )
        if suffixes is not None and out.suffix.lower() not in suffixes:
            raise UserError(
                f"the {label} {str(out)!r} should end with {' or '.join(suffixes)}",
                f"name it e.g. {out.stem or 'out'}{suffixes[0]}",
            )
        check_existing(out, label, force=self.force, force_hint=self.force_hint)
        self.outputs.append(ident)
        return out

    def protected(self) -> list[Identity]:
        return list(self.inputs)


def check_existing(path: Path, label: str, *, force: bool, force_hint: str) -> None:
    """Refuse an existing target that is not a regular file (always), or any (without force)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(
            f"cannot check the {label} {str(path)!r}: {exc.strerror or exc}", "choose another path"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise UserError(
            f"the {label} {str(path)!r} exists and is {kind}",
            "rdprune-onnx only replaces regular files, even with --force; choose another path",
        )
    if not force:
        raise UserError(f"{label} {str(path)!r} already exists", force_hint)


# --- staging folders ----------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive under another user
        return True
    return True


def sweep_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove staging folders left in ``folder`` by our processes that are gone."""
    removed: list[Path] = []
    if os.name != "posix":
        return removed
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    uid = os.getuid()
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        pid = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            st = os.lstat(entry)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or _pid_alive(int(pid)):
            continue
        log.info("removing %s, left by a run that is gone", entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staging(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh staging folder in ``folder`` (named after this process), removed on exit."""
    sweep_stale(folder)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    except OSError as exc:
        raise UserError(
            f"cannot write in {str(folder)!r}: {exc.strerror or exc}", "choose another path"
        ) from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- publishing ------------------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """``renameat2(..., RENAME_NOREPLACE)``; False where the system lacks it."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish(
    src: Path,
    target: Path,
    *,
    force: bool,
    label: str = "output",
    protect: Sequence[Identity] = (),
    force_hint: str = FORCE_HINT,
) -> None:
    """Move the staged file ``src`` to ``target`` in one step (see the module docstring)."""
    with open(src, "rb") as fh:
        os.fsync(fh.fileno())
    ident = identity(target, label)
    for other in protect:
        if same(ident, other):
            raise UserError(
                f"refusing to overwrite the {other.label} {str(target)!r} with the {label}",
                f"choose another {label} path",
            )
    if force:
        check_existing(target, label, force=True, force_hint=force_hint)
        os.replace(src, target)
        return
    try:
        os.link(src, target)
    except FileExistsError:
        raise UserError(
            f"{label} {str(target)!r} already exists (it appeared during the run)", force_hint
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        try:
            if not _renameat2_noreplace(src, target):
                # No atomic no-replace step on this file system: the best check there is.
                check_existing(target, label, force=False, force_hint=force_hint)
                os.rename(src, target)
        except FileExistsError:
            raise UserError(
                f"{label} {str(target)!r} already exists (it appeared during the run)",
                force_hint,
            ) from None
        return
    os.unlink(src)


def write_file(
    target: str | os.PathLike[str],
    write: Callable[[IO[bytes]], object],
    *,
    force: bool,
    label: str = "output",
    protect: Sequence[Identity] = (),
    force_hint: str = FORCE_HINT,
) -> Path:
    """Write one file through a staging folder and :func:`publish` it; returns the target.

    ``write`` receives a binary file object. A failure leaves nothing behind; an
    ``OSError`` becomes a one-line :class:`UserError` naming the file.
    """
    out = Path(target)
    folder = out.parent if str(out.parent) else Path()
    check_existing(out, label, force=force, force_hint=force_hint)
    try:
        with staging(folder) as stage:
            staged = stage / "content"
            with open(staged, "xb") as fh:
                write(fh)
            publish(staged, out, force=force, label=label, protect=protect, force_hint=force_hint)
    except OSError as exc:
        raise UserError(
            f"could not write the {label} {str(out)!r}: {exc.strerror or exc}",
            "check the folder (writable, space left) or choose another path",
        ) from None
    return out


def write_text(
    target: str | os.PathLike[str],
    text: str,
    *,
    force: bool,
    label: str = "output",
    protect: Sequence[Identity] = (),
    force_hint: str = FORCE_HINT,
) -> Path:
    return write_file(
        target,
        lambda fh: fh.write(text.encode()),
        force=force,
        label=label,
        protect=protect,
        force_hint=force_hint,
    )
