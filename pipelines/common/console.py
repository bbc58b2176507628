"""The terminal of a command that drives Ray, and the log file that holds everything.

A pipeline run is one driver and many Ray processes, and with ``log_to_driver`` every line
they print reaches the driver: Ray Train's controller and its "Reporting training result"
dictionaries, Ray Data's execution plans, Ray's and MLflow's log records. A user needs the
pipeline's own lines, progress with an ETA, the warnings that concern them, every error,
and the summary. :func:`open_console` gives them that:

* **Everything goes to a log file** (``runs/logs/<command>-<time>-<pid>.log``,
  ``STEP_LOG_DIR`` moves it), whose path is printed first: the process's stdout and
  stderr, Ray's worker lines included (prefix and all), and every Python log record.
* **The terminal shows** (:class:`LineRules`): the driver's own lines; workers' lines that are
  this project's (progress: ``[train ...]``, ``eval: ...``; warnings of its loggers,
  :func:`worker_console`); and every error: Ray's raylet and autoscaler messages (a worker
  killed, out of memory, resources nobody has), a worker's traceback (its first line and
  its exception; the frames stay in the file), a Ray C++ error line, a log record at ERROR
  or above (with the traceback it prints: its first line and its exception, as a
  worker's). Log records at WARNING show when they come from this project's packages.
* ``--verbose`` (:data:`VERBOSE_ENV`) shows every line, as Ray prints it.

Ray's own switches do what they can before any line is filtered: ``log_to_driver`` stays
on (workers' errors and progress must reach the driver, also in a Ray job's log on a
cluster); ``RAY_DEDUP_LOGS`` stays on (repeated lines folded); Ray Train's
``LoggingConfig(log_level="WARNING")`` keeps its controller's and workers' INFO lines
off the console (its system log files in Ray's session folder keep them;
pipelines/train/trainer.py); a local Ray runs without Ray Train's preemption watcher,
whose actor logs a C++ error on every training about its restart arguments and has
nothing to watch on one machine (pipelines/common/cluster.py); Ray Tune runs with
``verbose=0``. What no switch reaches is filtered here: Ray Train logs "Reporting training
result" on a logger named after its source file, which its log level does not cover.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

VERBOSE_ENV = "STEP_VERBOSE"
LOG_DIR_ENV = "STEP_LOG_DIR"
OWN_PACKAGES = ("pipelines", "data_prep", "step_model")
# A line that Ray's driver prints for a worker: "(RayTrainWorker pid=12, ip=10.0.0.2) ...",
# "(raylet) ...", "(autoscaler +3s) ..."; colour codes stripped first.
_WORKER = re.compile(r"^\((?P<source>[^()]*?pid=[^()]*|raylet[^()]*|autoscaler[^()]*)\) ?"
                     r"(?P<message>.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The project's own lines when a worker prints them: progress and warnings.
_OWN = re.compile(r"^(\[(train|eval|tune|analyze|predict)\b[^\]]*\] |(eval|tune|analyze): |"
                  r"step \w+: |(WARNING|ERROR|CRITICAL) (pipelines|data_prep|step_model)\b)")
# Ray's C++ log lines ("[2026-12-06 21:05:09,969 E 6425 6502] core_worker.cc:2465: ..."):
# E(rror) and F(atal) are errors.
_NATIVE_ERROR = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [EF] \d+ \d+\]")
# A library's log record on the driver ("2026-12-06 21:02:18,156\tWARNING worker.py:..."),
# printed by the handler the library installed itself (Ray, Ray Data).
_RECORD = re.compile(r"^\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d\S*\s+(?P<level>[A-Z]+)\b")
_ERROR_LEVELS = {"ERROR", "CRITICAL", "FATAL"}


def _is_frame(text: str) -> bool:
    """A traceback's frame line (indented) or blank line: the log file keeps them."""
    return text[:1].isspace() or not text


def verbose() -> bool:
    """False only under a quiet console (:func:`open_console` in this process, or in the
    driver that started this local Ray): commands without one print as Ray does."""
    return os.environ.get(VERBOSE_ENV) != "0"


class LineRules:
    """Which lines the terminal shows (the module docstring says which and why), with the
    state a worker's traceback needs: which sources are inside one."""

    def __init__(self) -> None:
        self.in_traceback: set[str] = set()
        self.after_exception: set[str] = set()
        self.ignored: set[str] = set()
        self.after_error_record = False
        self.in_record_traceback = False

    def _driver_line(self, text: str) -> bool:
        # a library's ERROR record with a traceback (Ray Tune's failed state sync) shows
        # as a worker's does: the record, the traceback's first line and its exception
        if self.in_record_traceback:
            if _is_frame(text):
                return False
            self.in_record_traceback = False
            return True
        record = _RECORD.match(text)
        after_error, self.after_error_record = self.after_error_record, False
        if record is None:
            self.in_record_traceback = (after_error
                                        and text.startswith("Traceback (most recent call"))
            return True
        self.after_error_record = record["level"] in _ERROR_LEVELS
        return self.after_error_record

    def shown(self, line: str) -> bool:
        text = _ANSI.sub("", line)
        worker = _WORKER.match(text)
        if worker is None:
            return self._driver_line(text)
        source, message = worker["source"], worker["message"]
        if "pid=" not in source:
            return True  # raylet, autoscaler: a worker killed, memory, resources
        if message.startswith("Exception ignored in"):
            self.ignored.add(source)  # Python's own word: e.g. a trial's actor ended by Tune
            return False
        if message.startswith("Traceback (most recent call last)"):
            self.in_traceback.add(source)
            return source not in self.ignored
        if source in self.in_traceback:
            if _is_frame(message):
                return False
            self.in_traceback.discard(source)
            if source in self.ignored:
                self.ignored.discard(source)
                return False
            self.after_exception.add(source)
            return True  # the exception
        if source in self.after_exception:
            self.after_exception.discard(source)
            if message.startswith(": "):
                return True  # the message of an exception printed in two writes
        return bool(_OWN.match(message) or _NATIVE_ERROR.match(message)
                    or message.startswith("Exception in thread"))


class _Tee:
    """A text stream that writes every line to the log file and the shown ones to
    ``terminal``: what ``sys.stdout`` / ``sys.stderr`` become."""

    def __init__(self, terminal: TextIO, log: TextIO, rules: LineRules | None,
                 lock: threading.Lock) -> None:
        self.terminal, self.log, self.rules, self.lock = terminal, log, rules, lock
        self.pending = ""

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        self.log.write(_ANSI.sub("", line) + "\n")
        if self.rules is None or self.rules.shown(line):
            self.terminal.write(line + "\n")

    def flush(self) -> None:
        with self.lock:
            self.log.flush()
            self.terminal.flush()

    def close_pending(self) -> None:
        with self.lock:
            if self.pending:
                self._line(self.pending)
                self.pending = ""
        self.flush()

    def isatty(self) -> bool:
        return False  # progress as plain lines, not bars redrawn with carriage returns

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.terminal, "encoding", "utf-8")

    def writable(self) -> bool:
        return True


class _Locked:
    def __init__(self, stream: TextIO, lock: threading.Lock) -> None:
        self.stream, self.lock = stream, lock

    def write(self, text: str) -> None:
        with self.lock:
            self.stream.write(text)

    def flush(self) -> None:
        with self.lock:
            self.stream.flush()


class _TerminalRecords(logging.Filter):
    """Log records for the terminal: errors from anyone, warnings from this project."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (
            record.levelno >= logging.WARNING and record.name.startswith(OWN_PACKAGES))


def open_console(command: str, *, verbose_: bool = False) -> Path:
    """Route this process's output (see the module docstring); returns the log file.

    Call it before Ray starts: the workers of a local Ray inherit :data:`VERBOSE_ENV`.
    """
    os.environ[VERBOSE_ENV] = "1" if verbose_ else "0"
    if not verbose_:  # Ray Tune's legacy output engine honours verbose=0; the new one
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # prints its experiment box anyway
    # MLflow's records go through the root logger (below) instead of its own handler
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    folder = Path(os.environ.get(LOG_DIR_ENV) or "runs/logs").absolute()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives with the process)
    lock = threading.Lock()
    rules = None if verbose_ else LineRules()
    terminal_err = sys.stderr
    tees = [_Tee(sys.stdout, log, rules, lock), _Tee(sys.stderr, log, rules, lock)]
    for tee in tees:  # handlers that libraries made before this (Ray's, at import)
        for handler in _stream_handlers():
            if handler.stream is tee.terminal:
                handler.setStream(tee)
    sys.stdout, sys.stderr = tees  # type: ignore[assignment]

    to_file = logging.StreamHandler(_Locked(log, lock))  # one writer at a time: Ray's
    # log thread prints workers' lines while the main thread logs
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(terminal_err)
    to_terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose_:
        to_terminal.addFilter(_TerminalRecords())
    root = logging.getLogger()
    root.handlers = [to_file, to_terminal]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings are records of "py.warnings"

    def close() -> None:
        for tee in tees:
            tee.close_pending()

    atexit.register(close)
    print(f"log: {path} (everything{'' if verbose_ else '; --verbose shows it here'})",
          flush=True)
    return path


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)
            and not isinstance(h, logging.FileHandler)]


def worker_console() -> None:
    """In a Ray worker: this project's warnings as lines the driver shows
    (``WARNING pipelines.x: ...``); Ray configures a worker's root logger to print the bare
    message, which the driver cannot tell from Ray's own lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    for name in OWN_PACKAGES:
        own = logging.getLogger(name)
        if not any(getattr(h, "_step_console", False) for h in own.handlers):
            handler._step_console = True  # type: ignore[attr-defined]
            own.addHandler(handler)
        own.propagate = False
