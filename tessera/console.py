"""The operator's console: one live line per stage, the full detail in a log file per stage.

    with Console(log_dir) as console:          # this process's output -> <log_dir>/tessera.log
        with console.stage("prepare"):         # ... -> <log_dir>/prepare.log; the console shows one line
            prepare(cfg)
        console.print("summary")               # the console itself

Inside a stage everything the process writes goes to the stage's log: Ray's own logging, Ray Data's
progress, worker output Ray forwards to the driver, warnings, and native libraries writing to file
descriptors 1 and 2 (both descriptors are redirected, and `sys.stdout` / `sys.stderr` with them).
The console keeps a duplicate of the original stdout. Its live line is the stage's name, the time
spent, the latest progress line the stage wrote (a line starting with `[word]`, also when Ray
forwarded it from a worker) and, when that line has a count `a/b`, an estimate of the time left. On
a terminal the line is redrawn in place; otherwise (CI, `ray job logs`) a new line is printed every
`interval_s` when the progress changed, so a log never holds redraw fragments. A stage that fails
prints its name, the cause in one line and the path of its log (which has the traceback), and exits
with status 1. A log directory on an object store is written locally and uploaded after each stage.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from typing import Iterator, TextIO

from tessera import storage

DEFAULT_INTERVAL_S = float(os.environ.get("TESSERA_CONSOLE_INTERVAL_S", "30"))
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\(.*?pid=\d+[^)]*\)\s*")  # "(RayTrainWorker pid=123) " as Ray forwards
_PROGRESS = re.compile(r"^\[[a-z][\w-]*\] ")
_COUNT = re.compile(r"(\d+)/(\d+)")


def progress_text(raw_line: str) -> str | None:
    """The progress a stage's log line carries, or None: `[word] ...` lines, with terminal colours,
    carriage-return redraws and Ray's `(Actor pid=...)` forwarding prefix removed."""
    line = _ANSI.sub("", raw_line).rsplit("\r", 1)[-1].strip()
    line = _RAY_PREFIX.sub("", line)
    return line if _PROGRESS.match(line) else None


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Eta:
    """Time left from the last `a/b` count of the progress lines: the rate since the count was first
    seen with this `b` (a new `b` is a new phase and starts over)."""

    def __init__(self):
        self.first: tuple[float, int, int] | None = None

    def update(self, text: str, now: float) -> str:
        counts = _COUNT.findall(text)
        if not counts:
            return ""
        a, b = (int(x) for x in counts[-1])
        if self.first is None or self.first[2] != b or a < self.first[1]:
            self.first = (now, a, b)
            return ""
        t0, a0, _ = self.first
        if a <= a0 or b <= a:
            return ""
        return f"ETA {format_seconds((now - t0) / (a - a0) * (b - a))}"


class _Stage:
    def __init__(self, name: str, log_path: str, log_uri: str):
        self.name, self.log_path, self.log_uri = name, log_path, log_uri
        self.start = time.monotonic()
        self.progress = ""
        self.eta = ""
        self.note = ""
        """Set by the caller: what the stage's final line adds (e.g. "skipped: complete")."""
        self._offset = 0
        self._eta = _Eta()
        self._partial = ""

    def read_progress(self) -> bool:
        """Take in what the log gained since the last read; True if the progress line changed."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return False
        self._offset += len(data)
        lines = (self._partial + data.decode("utf-8", "replace")).split("\n")
        self._partial = lines.pop()
        latest = None
        for line in lines + ([self._partial] if "\r" in self._partial else []):  # a `\r` redraw is progress too
            latest = progress_text(line) or latest
        if latest is None or latest == self.progress:
            return False
        self.progress = latest
        self.eta = self._eta.update(latest, time.monotonic())
        return True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Console:
    """See the module docstring. `stream`: where console lines go (default: the process's stdout as it
    was when the console opened); `interval_s`: seconds between progress lines when it is not a terminal;
    `settle_s`: how long a finished stage's log stays open for late forwarded lines."""

    def __init__(self, log_dir: str, stream: TextIO | None = None, interval_s: float | None = None, width: int = 160,
                 settle_s: float = 1.0):
        self.log_dir = log_dir
        self.settle_s = settle_s  # lines Ray forwards from workers reach the driver up to about a second late
        self.interval_s = DEFAULT_INTERVAL_S if interval_s is None else interval_s
        self.width = width
        self._stream_arg = stream
        self._local = storage.is_local(log_dir)
        self._stage: _Stage | None = None
        self._lock = threading.Lock()
        self._live = False  # a live line is on the terminal, not yet ended by a newline
        self._opened = False

    # -- opening and closing: the process's fds 1/2 point at a log while the console is open --------------

    def __enter__(self) -> "Console":
        self._dir = storage.absolute(self.log_dir) if self._local else tempfile.mkdtemp(prefix="tessera-logs-")
        os.makedirs(self._dir, exist_ok=True)
        _flush_std()
        self._saved_fds = (os.dup(1), os.dup(2))
        self._saved_std = (sys.stdout, sys.stderr)
        self.stream = self._stream_arg or open(os.dup(self._saved_fds[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        self.tty = self.stream.isatty()
        self._redirect(self._path("tessera"))
        self._opened = True
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="tessera-console", daemon=True)
        self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._ticker.join()
        _flush_std()
        sys.stdout, sys.stderr = self._saved_std
        os.dup2(self._saved_fds[0], 1)
        os.dup2(self._saved_fds[1], 2)
        for fd in self._saved_fds:
            os.close(fd)
        self._upload("tessera")
        if self._stream_arg is None:
            self.stream.close()
        self._opened = False

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, f"{name}.log")

    def log_uri(self, name: str) -> str:
        """Where the named log is (after upload, for a log directory on an object store)."""
        return self._path(name) if self._local else storage.join(self.log_dir, f"{name}.log")

    def _redirect(self, path: str) -> None:
        _flush_std()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # Python-level writers too: under a test runner sys.stdout may not be fd 1 at all
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)

    def _upload(self, name: str) -> None:
        if not self._local and os.path.exists(self._path(name)):
            with open(self._path(name), "rb") as f:
                storage.write_bytes(self.log_uri(name), f.read())

    # -- the console's own lines ----------------------------------------------------------------------

    def print(self, text: str = "") -> None:
        """A line on the console (and, for the record, in the current log)."""
        with self._lock:
            self._end_live()
            self.stream.write(text + "\n")
            self.stream.flush()
        if self._opened:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def _end_live(self) -> None:
        if self._live:
            self.stream.write("\r\x1b[K")
            self._live = False

    def _line(self, stage: _Stage) -> str:
        parts = [f"[{stage.name}] {format_seconds(stage.elapsed)}"]
        if stage.progress:
            parts.append(stage.progress if not stage.progress.startswith(f"[{stage.name}] ")
                         else stage.progress[len(stage.name) + 3:])
        if stage.eta:
            parts.append(stage.eta)
        line = " · ".join(parts)
        return line if len(line) <= self.width else line[: self.width - 1] + "…"

    def _tick(self) -> None:
        last_printed, last_text = 0.0, ""
        while not self._stop.wait(1.0 if self.tty else 0.5):
            with self._lock:
                stage = self._stage
                if stage is None:
                    last_text = ""
                    continue
                changed = stage.read_progress()
                if self.tty:
                    self.stream.write("\r\x1b[K" + self._line(stage))
                    self.stream.flush()
                    self._live = True
                elif changed and stage.progress != last_text and time.monotonic() - last_printed >= self.interval_s \
                        and stage.elapsed >= self.interval_s:
                    self.stream.write(self._line(stage) + "\n")
                    self.stream.flush()
                    last_printed, last_text = time.monotonic(), stage.progress

    # -- stages ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[_Stage]:
        """Run a stage with its output in `<log_dir>/<name>.log`; its final console line says how it ended."""
        assert self._opened, "open the console first: with Console(...) as console"
        path = self._path(name)
        with open(path, "a") as f:
            f.write(f"==== {name} {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
        stage = _Stage(name, path, self.log_uri(name))
        with self._lock:
            self._redirect(path)
            self._stage = stage
        try:
            yield stage
        except KeyboardInterrupt:
            self._finish(stage, f"[{name}] interrupted after {format_seconds(stage.elapsed)} · log {stage.log_uri}")
            raise
        except SystemExit as e:
            if e.code not in (None, 0):
                cause = e.code if isinstance(e.code, str) else f"exit status {e.code}"
                self._finish(stage, f"[{name}] failed after {format_seconds(stage.elapsed)}: {cause} · log {stage.log_uri}")
            else:
                self._finish(stage, self._done_line(stage))
            if isinstance(e.code, str):  # its text is on the console already; Python would print it again on exit
                raise SystemExit(1) from e
            raise
        except Exception as e:  # noqa: BLE001 - every failure gets its one line; the traceback goes to the log
            traceback.print_exc()
            self._finish(stage, f"[{name}] failed after {format_seconds(stage.elapsed)}: {one_line_cause(e)} · "
                                f"full log: {stage.log_uri}")
            raise SystemExit(1) from e
        else:
            self._finish(stage, self._done_line(stage))

    def _done_line(self, stage: _Stage) -> str:
        note = f" · {stage.note}" if stage.note else ""
        return f"[{stage.name}] done in {format_seconds(stage.elapsed)}{note} · log {stage.log_uri}"

    def _finish(self, stage: _Stage, line: str) -> None:
        _flush_std()
        time.sleep(min(self.settle_s, stage.elapsed / 10))  # a worker's last lines land in its stage's log, not the next one's
        with self._lock:
            self._stage = None
            self._redirect(self._path("tessera"))
        self._upload(stage.name)
        self.print(line)


@contextlib.contextmanager
def redirected(fd: int, target: int) -> Iterator[None]:
    """File descriptor `fd` (1: stdout, 2: stderr) writes into the open descriptor `target` meanwhile."""
    _flush_std()
    saved = os.dup(fd)
    os.dup2(target, fd)
    try:
        yield
    finally:
        _flush_std()
        os.dup2(saved, fd)
        os.close(saved)


def one_line_cause(error: BaseException) -> str:
    """The innermost cause of an error in one line: `Type: first line of its message`."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    message = lines[0] if lines else ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= 200 else text[:199] + "…"


def _flush_std() -> None:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except (ValueError, OSError, AttributeError):
            pass
