"""Writing a merged model's folder without ever losing a file the user had.

A merge can take minutes, so :func:`check_output` runs first, before any work: it refuses every
output path whose writing could destroy something that pleas did not write (an unrelated
folder, a file, a symlink, the current directory) or that cannot be written at all.
:func:`publish` then writes everything into a hidden temp folder next to the output and moves
it into place in one rename, so that at every instant the path holds either the old complete
output or the new complete one, never a half-written mix.  Only the files pleas itself writes
(:data:`OUTPUT_FILES`) are ever deleted, even with ``overwrite``.

A pleas output is a directory whose ``merged.json`` parses and has a ``"format"`` of
:data:`pleas.merged.FORMATS` (the current one or the older dense one).  A pleas report (the
``--report`` copy) is a JSON object whose top-level key ``"pleas_report"`` is ``true``
(:func:`mark_report` adds it).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import signal
import stat
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator

#: the only names pleas writes into an output folder, hence the only ones it may delete
OUTPUT_FILES = ("model.safetensors", "merged.json", "report.json")
REPORT_MARKER = "pleas_report"
_TMP_TAG = "pleas-tmp"
_MAX_JSON_BYTES = 64 << 20  # a merged.json or report bigger than this is not one of ours


class OutputError(ValueError):
    """An output path pleas refuses to write, said in one line: the path, the problem, the fix."""


class Terminated(BaseException):
    """SIGTERM arrived while :func:`handle_termination` was active.

    A BaseException (like KeyboardInterrupt) so that no ``except Exception`` swallows it and
    every ``finally`` clean-up runs; a CLI exits with :attr:`exit_code` (128 + SIGTERM).
    """

    exit_code = 128 + int(signal.SIGTERM)


# ----------------------------------------------------------------------------- small helpers


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status):
    setting and restoring it, the only portable way, briefly affects other threads' files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _load_json(path: Path) -> object | None:
    """The JSON in a regular file, or None when it is not a (small, regular) JSON file.

    ``lstat`` first so that a FIFO or device is never opened (that could block forever) and a
    symlink is never followed.
    """
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_JSON_BYTES:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def is_pleas_output(path: Path) -> bool:
    """True for a real directory (not a symlink) holding a ``merged.json`` of pleas' format."""
    from .merged import FORMATS

    if path.is_symlink() or not path.is_dir():
        return False
    desc = _load_json(path / "merged.json")
    return isinstance(desc, dict) and desc.get("format") in FORMATS


def is_pleas_report(path: Path) -> bool:
    """True for a regular JSON file whose top-level ``"pleas_report"`` is ``true``."""
    doc = _load_json(path)
    return isinstance(doc, dict) and doc.get(REPORT_MARKER) is True


def mark_report(text: str | bytes) -> bytes:
    """The report JSON with ``"pleas_report": true`` first: a later run may then replace it."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("the report must be a JSON object")
    doc = {REPORT_MARKER: True, **{k: v for k, v in doc.items() if k != REPORT_MARKER}}
    return (json.dumps(doc, indent=2) + "\n").encode()


def _foreign_entries(folder: Path) -> list[str]:
    """Names in an output folder that pleas did not write (anything but regular known files)."""
    foreign = []
    for entry in sorted(os.listdir(folder)):
        st = os.lstat(folder / entry)
        if entry not in OUTPUT_FILES or not stat.S_ISREG(st.st_mode):
            foreign.append(entry)
    return foreign


def _first_existing(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists (``lexists``: a dangling link counts)."""
    for anc in path.parents:
        if os.path.lexists(anc):
            return anc
    return Path(path.anchor or ".")


def _check_location(path: Path, what: str) -> None:
    """Refuse a path under a file, or whose first existing ancestor is not writable.

    ``os.access`` is cheap and right for ordinary users; root passes it on most folders (root
    ignores permission bits) and is then stopped only by read-only mounts, which it reports.
    """
    anc = _first_existing(path)
    if not anc.is_dir():
        raise OutputError(f"{what} {path} is under a file ({anc}); choose a path in a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path} cannot be written: {anc} is not writable; "
                          "choose a writable location")


def _is_cwd_or_ancestor(path: Path) -> bool:
    """True when writing ``path`` would replace the current directory or a folder above it."""
    cwd = Path.cwd().resolve()
    target = path.resolve()
    return target == cwd or target in cwd.parents


# ----------------------------------------------------------------------------- pre-flight check


def _check_out(out: Path, overwrite: bool) -> None:
    """Every refusal for the output folder itself (see :func:`check_output`)."""
    if out.name in ("", ".", "..") or _is_cwd_or_ancestor(out):
        raise OutputError(f"output {out} is the current directory or one above it; "
                          "name a new folder for the merged model")
    if out.is_symlink():
        raise OutputError(f"output {out} is a symbolic link; pleas does not write through "
                          "links: name the real folder or a new one")
    if os.path.lexists(out):
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is a file, not a folder; "
                              "choose another path")
        if not is_pleas_output(out):
            raise OutputError(f"output {out} exists and is not an earlier pleas output (no "
                              "merged.json of pleas' format); choose a new folder")
        foreign = _foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:8]) + (", ..." if len(foreign) > 8 else "")
            raise OutputError(f"output {out} is an earlier pleas output but also holds files "
                              f"pleas did not write ({shown}); pleas never deletes them: move "
                              "them away or choose a new folder")
        if not overwrite:
            raise OutputError(f"output {out} exists (an earlier pleas output); pass "
                              "--overwrite to replace it")
    _check_location(out, "output")


def _check_report(report: Path, out: Path, overwrite: bool) -> None:
    """Every refusal for the report copy's path (see :func:`check_output`)."""
    inside = report.resolve()
    if inside == out.resolve() or out.resolve() in inside.parents:
        raise OutputError(f"report {report} is inside the output folder {out}; "
                          "the folder gets its own report.json: choose a path outside it")
    if report.is_symlink():
        raise OutputError(f"report {report} is a symbolic link; name a real file path")
    if report.is_dir():
        raise OutputError(f"report {report} is a folder; name a file, e.g. {report}/report.json")
    _check_location(report, "report")
    if os.path.lexists(report):
        if not is_pleas_report(report):
            raise OutputError(f"report {report} exists and is not a pleas report; "
                              "choose another path")
        if not overwrite:
            raise OutputError(f"report {report} exists (an earlier pleas report); pass "
                              "--overwrite to replace it")


def check_output(out: str | os.PathLike[str], overwrite: bool = False,
                 report: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`OutputError` unless ``out`` (and ``report``) can be written safely.

    Cheap and free of side effects, so a CLI calls it before minutes of merging.  Refused:
    ``.``/``..``/the current directory or one above it; a symlink; an existing file; an existing
    folder that is not an earlier pleas output; a pleas output holding files pleas did not
    write; a pleas output without ``overwrite``; a path under a file; an unwritable location.
    For ``report``: a folder, a symlink, a path inside ``out``, under a file or unwritable, an
    existing file that is not a pleas report, or a pleas report without ``overwrite``.
    """
    out = Path(out)
    _check_out(out, overwrite)
    if report is not None:
        _check_report(Path(report), out, overwrite)


# ----------------------------------------------------------------------------- atomic renames

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {getattr(errno, n) for n in ("ENOSYS", "EINVAL", "EOPNOTSUPP", "ENOTSUP")
                if hasattr(errno, n)}


def _libc_renameat2():
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the system or filesystem lacks it.

    Any other failure is raised as the OSError it is (e.g. EEXIST: something appeared at dst).
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _plain_rename(src: Path, dst: Path) -> None:
    """``os.rename``, as a seam the fault-injection tests can replace."""
    os.rename(src, dst)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to a ``dst`` that must not exist; never replaces what appeared meanwhile.

    Without renameat2 the check and the rename are two steps (a tiny window in which a folder
    created at ``dst`` by someone else, if empty, would be replaced; a non-empty one makes the
    rename fail).
    """
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(17, "appeared while pleas was writing", str(dst))
    _plain_rename(src, dst)


def _exchange(new: Path, out: Path) -> Path:
    """Swap the folders ``new`` and ``out`` in one atomic step (renameat2 RENAME_EXCHANGE).

    Returns where the old output now is: ``new`` after the exchange.  Where the exchange is
    unavailable, the fallback renames ``out`` to a hidden backup (returned), then ``new`` to
    ``out``: between those two renames (microseconds) ``out`` does not exist, although no file
    is lost at any point, and a failure of the second rename moves the backup straight back.
    """
    if _renameat2(new, out, _RENAME_EXCHANGE):
        return new
    backup = out.with_name(f".{out.name}.pleas-old-{secrets.token_hex(4)}")
    _plain_rename(out, backup)
    try:
        _plain_rename(new, out)
    except BaseException:
        _plain_rename(backup, out)
        raise
    return backup


# ----------------------------------------------------------------------------- writing


def _fsync_dir(path: Path) -> None:
    """Make a rename or creation in ``path`` durable (where directories can be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_fd(fd: int, data: bytes) -> None:
    """Write all of ``data`` to an open file, give it mode 0o666 & ~umask, fsync and close it.

    Set explicitly because :func:`tempfile.mkstemp` creates files 0o600.
    """
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing one) holding ``data``, durable, with normal mode."""
    _write_fd(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                      0o666), data)


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first, for clean-up."""
    missing = []
    for p in [folder, *folder.parents]:
        if os.path.lexists(p):
            break
        missing.append(p)
    for p in reversed(missing):
        p.mkdir(mode=0o777)
    return missing


def _remove_known(folder: Path) -> bool:
    """Delete pleas' own file names from ``folder`` and the folder if that emptied it.

    Nothing else is ever deleted: a folder that still holds another file is left in place.
    Returns whether the folder is gone.
    """
    for name in OUTPUT_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
    try:
        os.rmdir(folder)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (the kernel keeps them pending) while pleas commits.

    The swap and the bookkeeping of which folder now holds what must not be split by an
    interrupt; a signal arriving meanwhile is delivered right after, as the usual exception.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _check_files(files: dict[str, bytes]) -> None:
    """Only pleas' own names, so that a later run recognises the folder and may replace it."""
    if set(files) - set(OUTPUT_FILES) or "merged.json" not in files:
        raise ValueError(f"publish writes merged.json and optionally {OUTPUT_FILES[0]} and "
                         f"{OUTPUT_FILES[2]}, nothing else; got {sorted(files)}")


def _stage(out: Path) -> Path:
    """A new hidden temp folder next to ``out`` (same filesystem, so the rename is atomic)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{_TMP_TAG}-", dir=out.parent))
    except OSError as err:
        raise OutputError(f"output {out} cannot be written: {err.strerror} in {out.parent}; "
                          "choose a writable location") from err


def _fill(tmp: Path, files: dict[str, bytes]) -> None:
    """Write the files into the staged folder and give it the mode a plain mkdir would have."""
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0o700
    for name, data in files.items():
        _write_file(tmp / name, data)
    _fsync_dir(tmp)


def _stage_report(report: Path, data: bytes) -> Path:
    """The report written to a hidden temp file next to its final path, fsynced."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{report.name}.{_TMP_TAG}-", dir=report.parent)
    except OSError as err:
        raise OutputError(f"report {report} cannot be written: {err.strerror} in "
                          f"{report.parent}; choose a writable location") from err
    try:
        _write_fd(fd, data)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def publish(out: str | os.PathLike[str], files: dict[str, bytes], overwrite: bool = False,
            report: str | os.PathLike[str] | None = None,
            report_bytes: bytes | None = None) -> Path:
    """Write ``files`` as the folder ``out`` (and ``report_bytes`` at ``report``), atomically.

    Runs :func:`check_output` again (the world may have changed since the pre-flight check),
    stages every file in a hidden ``.{name}.pleas-tmp-XXXX`` folder next to ``out`` and the
    report in a temp file next to ``report`` (a failure there fails the call before anything
    is published), then moves the folder into place: a rename where ``out`` does not exist
    (failing if something appeared meanwhile), an atomic exchange where it is an earlier pleas
    output (see :func:`_exchange`), after which only pleas' own files of the old output and
    its emptied folder are deleted.  Then the report replaces its path.

    On any exception, KeyboardInterrupt and :class:`Terminated` included, the temp folder and
    temp report are removed, folders this call created are removed again, and an old output is
    left exactly as it was (unless the exception came after the new output was in place).
    """
    out = Path(out)
    report = Path(report) if report is not None else None
    if (report is None) != (report_bytes is None):
        raise ValueError("publish needs both report and report_bytes, or neither")
    _check_files(files)
    check_output(out, overwrite, report)
    state = _Publication(out, report)
    try:
        state.stage(files, report_bytes)
        with _signals_deferred():
            state.commit(overwrite)
    except BaseException:
        with _signals_deferred():
            state.roll_back()
        raise
    return out


class _Publication:
    """What one :func:`publish` call has put where, so that a failure undoes exactly that."""

    def __init__(self, out: Path, report: Path | None):
        self.out, self.report = out, report
        self.created: list[Path] = []
        self.tmp: Path | None = None  # our staged folder, until it becomes the output
        self.old: Path | None = None  # the previous output, once swapped out
        self.tmp_report: Path | None = None
        self.published = False

    def stage(self, files: dict[str, bytes], report_bytes: bytes | None) -> None:
        """Write everything to temp places; nothing visible changes yet."""
        self.created += _make_parents(self.out.parent)
        self.tmp = _stage(self.out)
        _fill(self.tmp, files)
        if self.report is not None:
            self.created += _make_parents(self.report.parent)
            self.tmp_report = _stage_report(self.report, report_bytes)

    def commit(self, overwrite: bool) -> None:
        """Move the staged folder into place, retire the old one, then place the report."""
        check_output(self.out, overwrite, self.report)  # again: seconds may have passed
        if os.path.lexists(self.out):
            self.old = _exchange(self.tmp, self.out)
            self.tmp, self.published = None, True
        else:
            _rename_noreplace(self.tmp, self.out)
            self.tmp, self.published = None, True
        _fsync_dir(self.out.parent)
        if self.old is not None and not _remove_known(self.old):
            warnings.warn(f"the previous output now at {self.old} holds files pleas did not "
                          "write (added during the merge); it was left in place")
        self.old = None
        if self.tmp_report is not None:
            os.replace(self.tmp_report, self.report)
            self.tmp_report = None
            _fsync_dir(self.report.parent)

    def roll_back(self) -> None:
        """Remove every temp thing; an old output not yet swapped out was never touched."""
        if self.tmp_report is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_report)
        if self.tmp is not None:
            _remove_known(self.tmp)
        if self.old is not None:  # the exchange had happened: the new output is in place
            _remove_known(self.old)
        if not self.published:
            for folder in self.created:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


# ----------------------------------------------------------------------------- signals


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while active, so ``finally`` clean-ups run.

    Python's default SIGTERM action kills the process on the spot and leaves temp folders
    behind; with this, ``kill`` behaves like Ctrl-C.  The previous handler is restored on exit.
    Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
