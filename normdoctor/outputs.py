"""Everything a command writes: declared up front, checked before any work, written at the end.

An :class:`Outputs` plan holds the outputs of one command (``--json`` files, a patched model,
report folders) and the inputs they must never replace (model files, data, the ``--arch``
source).  :meth:`Outputs.check` validates every output before the work starts; the command then
stages what it computed (``write_text``, ``write_stream``, ``write_with``, ``write_folder``:
everything goes to temporary names beside the targets) and :meth:`Outputs.commit` publishes all
of them together, so a command that fails writes nothing.

The rules, each with a test in ``tests/test_outputs.py``:

* an output is never an input, compared by identity (device and inode, so hard links and
  symlinks count), never inside an input folder, and a folder output never holds an input;
* a symlink is written through: its target is replaced atomically, the link stays a link;
* a character device or a FIFO (``/dev/null``, ``/dev/stdout``, a named pipe) is opened and
  written directly, never replaced by a regular file; ``-`` is stdout where allowed;
* a regular file is written to a temporary file in the target's folder, flushed to disk and
  renamed over the target; a new file gets ``0o666 & ~umask`` (created with that mode, as
  ``open()`` would), a replaced file keeps its mode;
* a folder is built under a temporary name beside the target and published by a rename that
  fails if the target exists (``renameat2(RENAME_NOREPLACE)`` on Linux): of two concurrent
  writers exactly one succeeds, the other is told why; an existing folder, even an empty one,
  is refused unless ``force`` is given (files are then replaced one by one, the page last);
* every temporary file and folder is registered before it is created and removed on any exit:
  by the plan's context manager, and by :func:`remove_temporaries` (the command line calls it
  in a ``finally``, with :func:`interrupt_on_signals` turning SIGINT/SIGTERM into an exception);
* an ``OSError`` while writing becomes :class:`OutputError` with a sentence
  (``cannot write scan.json: no space left on device``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

from .errors import NormDoctorError

__all__ = [
    "Interrupted",
    "OutputError",
    "OutputExistsError",
    "Outputs",
    "interrupt_on_signals",
    "remove_temporaries",
    "spec_files",
    "write_atomic",
]

PathLike = str | os.PathLike[str]


class OutputError(NormDoctorError):
    """An output cannot be written (it is an input, its folder is missing, the disk is full)."""


class OutputExistsError(OutputError, FileExistsError):
    """An output folder exists (or appeared while the command worked) and may not be replaced."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: raised in the main thread so that every ``finally`` runs.

    Not a ``KeyboardInterrupt``: typer turns those into a silent exit code.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- temporaries: registered before they exist, removed on every exit ------------------------

_lock = threading.Lock()
_temporaries: dict[str, int] = {}  # path: the thread that made it


def _temporary_name(folder: str, name: str) -> str:
    """A registered, not yet created path ``folder/.name.<id>.tmp``."""
    path = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    with _lock:
        _temporaries[path] = threading.get_ident()
    return path


def _forget(path: str) -> None:
    with _lock:
        _temporaries.pop(path, None)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    _forget(path)


def remove_temporaries(*, all_threads: bool = False) -> None:
    """Remove the temporary files and folders this thread made that are still there.

    ``all_threads``: those of every thread of the process.
    """
    me = threading.get_ident()
    with _lock:
        paths = [p for p, owner in _temporaries.items() if all_threads or owner == me]
    for path in reversed(paths):
        _remove(path)


# -- signals -----------------------------------------------------------------------------------

_held = 0  # > 0 while outputs are being published: a signal waits until that is done
_pending: int | None = None
_unwinding = False


def _on_signal(signum: int, frame: Any) -> None:
    global _pending, _unwinding
    if _held:
        _pending = signum
        return
    if _unwinding:  # the first signal is already unwinding the stack: let the cleanup finish
        return
    _unwinding = True
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread; handlers restored after.

    Outside the main thread (where Python cannot install handlers) this does nothing.
    """
    global _pending, _unwinding
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        _pending, _unwinding = None, False


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Publishing is a few renames: a signal arriving meanwhile is acted on right after."""
    global _held, _pending
    main = threading.current_thread() is threading.main_thread()
    if main:
        _held += 1
    try:
        yield
    finally:
        if main:
            _held -= 1
            if not _held and _pending is not None:
                signum, _pending = _pending, None
                _on_signal(signum, None)


# -- errors ----------------------------------------------------------------------------------

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error",
    errno.EPIPE: "broken pipe",
}


def _reason(exc: OSError) -> str:
    if exc.errno in _REASONS:
        return _REASONS[exc.errno]
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


@contextlib.contextmanager
def _writing(where: object) -> Iterator[None]:
    """``OSError`` inside becomes :class:`OutputError`: ``cannot write WHERE: reason``."""
    try:
        yield
    except OutputExistsError:  # says what appeared, in its own words
        raise
    except OutputError as exc:
        if isinstance(exc.__cause__, OSError):  # a nested writer named its temporary path
            raise OutputError(f"cannot write {where}: {_reason(exc.__cause__)}") from exc.__cause__
        raise
    except OSError as exc:
        raise OutputError(f"cannot write {where}: {_reason(exc)}") from exc


# -- writing files -----------------------------------------------------------------------------


class _FdWriter(io.RawIOBase):
    """A raw file over a descriptor, every write through ``os.write``."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        return os.write(self._fd, data)

    def close(self) -> None:
        if not self.closed:
            super().close()
            os.close(self._fd)


@contextlib.contextmanager
def _create(path: str) -> Iterator[BinaryIO]:
    """A new file, mode ``0o666 & ~umask`` (as ``open()`` creates), synced to disk on success."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    with io.BufferedWriter(_FdWriter(fd), 1 << 20) as f:
        yield f  # type: ignore[misc]
        f.flush()
        os.fsync(fd)


def _fsync_folder(folder: str) -> None:
    """Make the renames in ``folder`` durable (best effort: not every system allows it)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists, even as an empty folder."""
    fn = _renameat2()
    if fn is not None:
        import ctypes

        at_fdcwd, rename_noreplace = -100, 1
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    # No renameat2 here: rename still refuses a non-empty folder, so of two writers of a report
    # only one succeeds; only an empty folder created in this instant could be replaced.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from exc
        raise


# -- what the inputs are -------------------------------------------------------------------------


def spec_files(spec: PathLike | None) -> list[Path]:
    """The files a model, data or ``--arch`` argument reads, found without importing anything.

    A path is itself; ``path/to/file.py:attr`` is the file; ``package.module:attr`` is every
    source file that import could run (the module and its packages' ``__init__.py``, on
    ``sys.path`` and in the current directory); ``random[:shape]`` and ``None`` read nothing.
    """
    if spec is None:
        return []
    text = os.fspath(spec)
    if text == "random" or text.startswith("random:"):
        return []
    if os.path.lexists(text) or ":" not in text:
        return [Path(text)]
    target = text.rpartition(":")[0]
    if target.endswith(".py") or "/" in target or os.sep in target:
        return [Path(target)]
    return _module_files(target)


def _module_files(dotted: str) -> list[Path]:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        return []
    found: dict[str, None] = {}
    module = sys.modules.get(dotted)
    if getattr(module, "__file__", None):
        found[module.__file__] = None  # type: ignore[union-attr,index]
    for root in (*sys.path, os.getcwd()):
        root = root or os.getcwd()
        if not os.path.isdir(root):
            continue
        base = os.path.join(root, *parts)
        candidates = [base + ".py", os.path.join(base, "__init__.py")]
        candidates += [os.path.join(root, *parts[:i], "__init__.py") for i in range(1, len(parts))]
        for candidate in candidates:
            if os.path.isfile(candidate):
                found[candidate] = None
    return [Path(p) for p in found]


@dataclass(frozen=True)
class _Input:
    label: str
    path: Path
    real: str
    dev: int
    ino: int
    is_dir: bool


def _inside(path: str, folder: str) -> bool:
    """``path`` lies strictly inside ``folder`` (both resolved)."""
    try:
        return path != folder and os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


# -- the plan ------------------------------------------------------------------------------------


class _Kind(str, Enum):
    STDOUT = "stdout"
    STREAM = "stream"  # a character device, a FIFO, an inherited descriptor: written directly
    FILE = "file"  # a regular file, new or replaced
    FOLDER = "folder"


_FD_FOLDER = re.compile(r"/proc/(self|thread-self|\d+)(/task/\d+)?/fd")


def _through_descriptor(path: str) -> bool:
    """``path`` leads through ``/proc/<pid>/fd`` (``/dev/stdout``, ``/dev/fd/3``)."""
    current = os.path.abspath(path)
    for _ in range(40):
        parent = os.path.realpath(os.path.dirname(current))
        if _FD_FOLDER.fullmatch(parent):
            return True
        if not os.path.islink(current):
            return False
        current = os.path.normpath(os.path.join(parent, os.readlink(current)))
    return False


@dataclass
class _Output:
    path: Path
    option: str | None
    folder: bool
    allow_stdout: bool = False
    force: bool = False
    force_hint: str | None = None
    # resolved by _resolve()
    kind: _Kind = _Kind.FILE
    real: str = ""
    exists: bool = False
    dev_ino: tuple[int, int] | None = None
    append: bool = False
    missing: list[str] = field(default_factory=list)  # parent folders to create, outermost first
    # staged
    staged: str | None = None
    last: tuple[str, ...] = ()
    owned: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        return f"{self.option} {self.path}" if self.option else str(self.path)


class Outputs:
    """The outputs of one command and the inputs they may not replace.

    Use::

        with Outputs() as plan:
            plan.add_input(model, "model"); plan.add_input_spec(data, "data")
            plan.file(json_out, "--json", stdout=True)
            plan.folder(report_dir, "--report")
            plan.check()                    # before any work: exit 2, nothing touched
            ...                             # the work
            plan.write_text(json_out, text) # staged under temporary names
            plan.write_folder(report_dir, build)
            plan.commit()                   # all published together
        # leaving the block removes whatever is still temporary

    Outputs declared as ``None`` are ignored, so optional options need no ``if``.
    """

    def __init__(self, inputs: Iterable[tuple[str, PathLike]] = ()) -> None:
        self._inputs: list[tuple[str, Path]] = []
        self._outputs: dict[str, _Output] = {}
        self._created: list[str] = []
        self._committed = False
        for label, path in inputs:
            self.add_input(path, label)

    # -- declaring ---------------------------------------------------------------------------
    def add_input(self, path: PathLike | None, label: str = "input") -> None:
        """An input file or folder (one that does not exist is skipped)."""
        if path is not None:
            self._inputs.append((label, Path(path)))

    def add_input_spec(self, spec: PathLike | None, label: str) -> None:
        """The files of a model/data/``--arch`` argument (see :func:`spec_files`)."""
        for path in spec_files(spec):
            self.add_input(path, label)

    def file(
        self, path: PathLike | None, option: str | None = None, *, stdout: bool = False
    ) -> None:
        """Declare an output file; ``stdout``: ``-`` means standard output."""
        if path is not None:
            self._declare(_Output(Path(path), option, folder=False, allow_stdout=stdout))

    def folder(
        self,
        path: PathLike | None,
        option: str | None = None,
        *,
        force: bool = False,
        force_hint: str | None = None,
    ) -> None:
        """Declare an output folder; ``force``: an existing one may be written into.

        ``force_hint`` names the way to force (``--force``), said when refusing.
        """
        if path is not None:
            self._declare(
                _Output(Path(path), option, folder=True, force=force, force_hint=force_hint)
            )

    def _declare(self, out: _Output) -> None:
        key = os.fspath(out.path)
        if key in self._outputs:
            other = self._outputs[key]
            raise OutputError(f"{other.label} and {out.label} name the same output")
        self._outputs[key] = out

    def _get(self, path: PathLike, folder: bool) -> _Output:
        try:
            out = self._outputs[os.fspath(path)]
        except KeyError as exc:
            raise KeyError(f"{path} was not declared as an output") from exc
        if out.folder != folder:
            raise TypeError(f"{out.label} was declared as a {'folder' if out.folder else 'file'}")
        return out

    # -- checking ------------------------------------------------------------------------------
    def check(self) -> None:
        """Validate every output against the inputs and each other; touch nothing.

        Raises:
            OutputError: with the reason (``OutputExistsError`` for an existing folder).
        """
        inputs = self._resolved_inputs()
        seen: list[_Output] = []
        for out in self._outputs.values():
            self._resolve(out)
            self._against_inputs(out, inputs)
            self._against_outputs(out, seen)
            seen.append(out)

    def _resolved_inputs(self) -> list[_Input]:
        found = []
        for label, path in self._inputs:
            try:
                st = os.stat(path)
            except (OSError, ValueError):
                continue  # loading it will say what is wrong
            found.append(
                _Input(
                    label,
                    path,
                    os.path.realpath(path),
                    st.st_dev,
                    st.st_ino,
                    stat.S_ISDIR(st.st_mode),
                )
            )
        return found

    def _resolve(self, out: _Output) -> None:
        """Find what ``out`` is now: stdout, a stream, a new or existing file or folder."""
        out.missing, out.dev_ino, out.append = [], None, False
        text = os.fspath(out.path)
        if text == "-":
            if out.folder or not out.allow_stdout:
                what = "a folder" if out.folder else "this output"
                raise OutputError(f"{out.label}: {what} cannot go to stdout; name a path")
            out.kind, out.real, out.exists = _Kind.STDOUT, "-", True
            return
        out.real = os.path.realpath(out.path)
        try:
            st = os.stat(out.path)
        except (FileNotFoundError, NotADirectoryError):  # a missing or non-folder parent
            out.exists = False
        except OSError as exc:
            raise OutputError(f"cannot write {out.path}: {_reason(exc)}") from exc
        else:
            out.exists = True
            out.dev_ino = (st.st_dev, st.st_ino)
        if not out.exists:
            out.kind = _Kind.FOLDER if out.folder else _Kind.FILE
            self._check_parent(out)
            return
        mode = st.st_mode
        if out.folder:
            out.kind = _Kind.FOLDER
            if not stat.S_ISDIR(mode):
                raise OutputExistsError(
                    f"{out.label} exists and is not a folder; choose another output folder"
                )
            if not out.force:
                empty = next(os.scandir(out.real), None) is None
                how = f"pass {out.force_hint}, or " if out.force_hint else ""
                state = "exists (empty)" if empty else "exists and is not empty"
                raise OutputExistsError(
                    f"output folder {out.path} {state}; refusing to overwrite it "
                    f"({how}choose another folder)"
                )
            if not os.access(out.real, os.W_OK | os.X_OK):
                raise OutputError(f"cannot write {out.path}: permission denied")
            return
        if stat.S_ISDIR(mode):
            raise OutputError(f"cannot write {out.path}: it is a folder")
        if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or _through_descriptor(text):
            out.kind = _Kind.STREAM
            out.append = _through_descriptor(text)  # a redirected stdout keeps what it holds
            return
        if not stat.S_ISREG(mode):
            raise OutputError(
                f"cannot write {out.path}: not a regular file, character device or FIFO"
            )
        out.kind = _Kind.FILE
        if not os.access(out.real, os.W_OK):  # open() would refuse it too
            raise OutputError(f"cannot write {out.path}: permission denied")
        self._check_parent(out)

    @staticmethod
    def _check_parent(out: _Output) -> None:
        """The nearest existing folder above the target is a writable folder."""
        folder = os.path.dirname(out.real)
        missing = []
        while not os.path.exists(folder):
            missing.append(folder)
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
        if not os.path.isdir(folder):
            raise OutputError(f"cannot write {out.path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {out.path}: permission denied in {folder}")
        out.missing = missing[::-1]

    @staticmethod
    def _against_inputs(out: _Output, inputs: Sequence[_Input]) -> None:
        if out.kind in (_Kind.STDOUT, _Kind.STREAM):
            return  # writing to a device or a pipe replaces nothing
        for inp in inputs:
            if out.dev_ino == (inp.dev, inp.ino) or out.real == inp.real:
                raise OutputError(
                    f"{out.label} is the {inp.label} {inp.path}: refusing to overwrite an input"
                )
            if inp.is_dir and _inside(out.real, inp.real):
                raise OutputError(
                    f"{out.label} is inside the {inp.label} folder {inp.path}: refusing to write "
                    "into an input folder"
                )
            if out.folder and _inside(inp.real, out.real):
                raise OutputError(
                    f"{out.label} holds the {inp.label} {inp.path}: refusing to overwrite an input"
                )

    @staticmethod
    def _against_outputs(out: _Output, seen: Sequence[_Output]) -> None:
        if out.kind is _Kind.STREAM:
            return  # /dev/null twice is fine
        for other in seen:
            if other.kind is _Kind.STREAM:
                continue
            same = out.real == other.real or (
                out.dev_ino is not None and out.dev_ino == other.dev_ino
            )
            if same:
                raise OutputError(f"{other.label} and {out.label} name the same output")
            for a, b in ((out, other), (other, out)):
                if b.folder and _inside(a.real, b.real):
                    raise OutputError(f"{a.label} is inside the output folder {b.label}")

    # -- staging ------------------------------------------------------------------------------
    def write_text(self, path: PathLike, text: str) -> None:
        """Stage ``text`` (UTF-8) for the declared output file ``path``."""
        self.write_bytes(path, text.encode("utf-8"))

    def write_bytes(self, path: PathLike, data: bytes) -> None:
        """Stage ``data`` for the declared output file ``path``."""
        self.write_stream(path, lambda f: f.write(data))

    def write_stream(self, path: PathLike, writer: Callable[[BinaryIO], object]) -> None:
        """Stage the declared output file ``path``: ``writer`` writes into an open binary file."""

        def save(staged: Path) -> None:
            with _create(os.fspath(staged)) as f:
                writer(f)

        self.write_with(path, save)

    def write_with(self, path: PathLike, save: Callable[[Path], object]) -> None:
        """Stage the declared output file ``path`` with a function that writes to a path.

        ``save`` gets a path with the target's file name in a private temporary folder beside
        the target; files it writes next to it (an ONNX model's ``.data``) are published beside
        the target too.
        """
        out = self._get(path, folder=False)
        self._restage(out)
        name = "stdout" if out.kind is _Kind.STDOUT else os.path.basename(out.real)
        with _writing(out.path):
            if out.kind in (_Kind.STDOUT, _Kind.STREAM):
                base = tempfile.gettempdir()
            else:
                base = os.path.dirname(out.real)
                self._make_parents(out)
            tmp = _temporary_name(base, name)
            os.mkdir(tmp, 0o700)
            out.staged = tmp
            save(Path(tmp) / name)
        written = sorted(os.listdir(tmp))
        if name not in written:
            raise RuntimeError(f"{out.label}: the writer left no file {name!r} to publish")
        extra = [n for n in written if n != name]
        if extra and out.kind in (_Kind.STDOUT, _Kind.STREAM):
            raise OutputError(
                f"cannot write {out.path}: it needs {', '.join(extra)} beside it, which a "
                "device, pipe or stdout cannot have"
            )
        if extra:  # companions are outputs too: never over an input or another output
            inputs = self._resolved_inputs()
            for extra_name in extra:
                companion = _Output(Path(os.path.dirname(out.real)) / extra_name, None, False)
                self._resolve(companion)
                self._against_inputs(companion, inputs)
                self._against_outputs(
                    companion, [o for o in self._outputs.values() if o is not out]
                )

    def write_folder(
        self,
        path: PathLike,
        build: Callable[[Path], object],
        *,
        last: Sequence[str] = (),
        owned: Collection[str] = (),
    ) -> None:
        """Stage the declared output folder ``path``: ``build`` fills an empty temporary folder.

        Args:
            last: names moved last when writing into an existing folder (``index.html``, so a
                page never points at half-written figures).
            owned: names this writer owns: when writing into an existing folder, those the new
                build lacks are removed (figures of an earlier report).
        """
        out = self._get(path, folder=True)
        self._restage(out)
        with _writing(out.path):
            self._make_parents(out)
            tmp = _temporary_name(os.path.dirname(out.real), os.path.basename(out.real))
            os.mkdir(tmp)  # not mkdtemp (private): the folder this becomes follows the umask
            out.staged, out.last, out.owned = tmp, tuple(last), frozenset(owned)
            build(Path(tmp))

    def _restage(self, out: _Output) -> None:
        if out.staged is not None:
            _remove(out.staged)
            out.staged = None
        self._resolve(out)  # the file system may have changed while the command worked

    def _make_parents(self, out: _Output) -> None:
        for folder in out.missing:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder)
                self._created.append(folder)
        out.missing = []

    # -- publishing ---------------------------------------------------------------------------
    def commit(self) -> None:
        """Publish every staged output: folders, then files, then streams (stdout, devices).

        Raises:
            OutputExistsError: a new output folder appeared while the command worked.
            OutputError: writing failed (``cannot write X: reason``).
        """
        staged = [o for o in self._outputs.values() if o.staged is not None]
        with _signals_held():
            for out in staged:
                if out.kind is _Kind.FOLDER:
                    with _writing(out.path):
                        self._publish_folder(out)
            for out in staged:
                if out.kind is _Kind.FILE:
                    with _writing(out.path):
                        self._publish_file(out)
            self._committed = True
        for out in staged:
            if out.kind in (_Kind.STDOUT, _Kind.STREAM):
                with _writing(out.path):
                    self._publish_stream(out)

    def _publish_folder(self, out: _Output) -> None:
        tmp = out.staged
        assert tmp is not None
        if not os.path.lexists(out.real) or not out.force:
            try:
                _rename_noreplace(tmp, out.real)
            except FileExistsError as exc:
                if not out.force:
                    raise OutputExistsError(
                        f"output folder {out.path} appeared while this command worked (another "
                        "normdoctor run?); nothing was written"
                    ) from exc
            else:
                _forget(tmp)
                out.staged = None
                _fsync_folder(os.path.dirname(out.real))
                return
        if not os.path.isdir(out.real):
            raise OutputExistsError(
                f"{out.label} exists and is not a folder; choose another output folder"
            )
        written = set(os.listdir(tmp))
        names = sorted(written - set(out.last)) + [n for n in out.last if n in written]
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out.real, name))
        for name in out.owned - written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out.real, name))
        _remove(tmp)
        out.staged = None

    def _publish_file(self, out: _Output) -> None:
        tmp = out.staged
        assert tmp is not None
        name = os.path.basename(out.real)
        folder = os.path.dirname(out.real)
        companions = sorted(n for n in os.listdir(tmp) if n != name)
        for extra in companions:  # the files the main one refers to go first
            os.replace(os.path.join(tmp, extra), os.path.join(folder, extra))
        staged = os.path.join(tmp, name)
        with contextlib.suppress(FileNotFoundError):
            current = os.stat(out.real)
            if stat.S_ISREG(current.st_mode):  # replacing keeps the mode, as open() would
                os.chmod(staged, stat.S_IMODE(current.st_mode))
        os.replace(staged, out.real)
        _fsync_folder(folder)
        _remove(tmp)
        out.staged = None

    def _publish_stream(self, out: _Output) -> None:
        tmp = out.staged
        assert tmp is not None
        (source,) = os.listdir(tmp)
        source_path = os.path.join(tmp, source)
        try:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            if out.kind is _Kind.STDOUT:
                with open(source_path, "rb") as f:
                    data = f.read()
                buffer = getattr(sys.stdout, "buffer", None)
                if buffer is not None:
                    buffer.write(data)
                    buffer.flush()
                else:
                    sys.stdout.write(data.decode("utf-8"))
                    sys.stdout.flush()
            else:
                with (
                    open(source_path, "rb") as src,
                    open(out.path, "ab" if out.append else "wb") as dst,
                ):
                    shutil.copyfileobj(src, dst, 1 << 20)
        finally:
            _remove(tmp)
            out.staged = None

    # -- cleaning up ---------------------------------------------------------------------------
    def discard(self) -> None:
        """Remove every staged temporary (and, before a commit, the parent folders made)."""
        for out in self._outputs.values():
            if out.staged is not None:
                _remove(out.staged)
                out.staged = None
        if not self._committed:
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        self._created = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def write_atomic(
    path: PathLike,
    data: bytes | str | Callable[[BinaryIO], object],
    *,
    inputs: Iterable[tuple[str, PathLike]] = (),
) -> Path:
    """Write one file by the rules of :class:`Outputs`, at once.

    Args:
        data: the bytes, the text (UTF-8), or a function writing into an open binary file.
        inputs: ``(label, path)`` pairs that ``path`` must not be.

    Raises:
        OutputError: ``path`` is an input, a folder, or cannot be written.
    """
    with Outputs(inputs) as plan:
        plan.file(path)
        plan.check()
        if isinstance(data, str):
            plan.write_text(path, data)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            plan.write_bytes(path, bytes(data))
        else:
            plan.write_stream(path, data)
        plan.commit()
    return Path(path)
