"""The detection process: ``python -m SACDiffLib detect … --progress lines`` in a child process, the way
SlicerMONAIAuto3DSeg runs its inference. A reader thread turns the child's output into events (progress, log, exit)
that the widget polls with a QTimer; ``cancel`` kills the whole process tree. Pure Python: no Slicer, no Qt, no torch
(torch is only ever imported by the child).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import NamedTuple, Optional


def _library_parent() -> Path:
    """Folder that holds SACDiffLib: the repository (source tree) or the scripted-modules folder (installed)."""
    here = Path(__file__).resolve()
    for parent in (here.parents[1], here.parents[2]):
        if (parent / "SACDiffLib" / "__init__.py").is_file():
            return parent
    raise RuntimeError(f"SACDiffLib not found beside {here.parents[1]}; reinstall the SACDiff extension")


LIBRARY_PARENT = _library_parent()
if str(LIBRARY_PARENT) not in sys.path:
    sys.path.insert(0, str(LIBRARY_PARENT))

from SACDiffLib.protocol import is_error_line, parse_progress  # noqa: E402  (torch-free; found via LIBRARY_PARENT)


def cudaAvailable() -> bool:
    """Asked of a child Python (torch is never imported into Slicer's own process)."""
    try:
        probe = subprocess.run([pythonExecutable(), "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.stdout.strip().endswith("True")


def libraryEnvironment() -> dict:
    """The environment of a SACDiffLib child process: the library's folder on PYTHONPATH, UTF-8 output (the library
    prints α, λ, ²: never the locale's codec)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(LIBRARY_PARENT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def pythonExecutable() -> str:
    """PythonSlicer inside Slicer (the launcher sets up Slicer's environment), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class EventKind(Enum):
    PROGRESS = "progress"  # fraction in 0..1 and the step's message
    LOG = "log"  # one line of the child's output
    EXIT = "exit"  # the child ended; code is its exit status


class Event(NamedTuple):
    """One thing the child process reported (as SlicerMONAIAuto3DSeg's events, typed)."""

    kind: EventKind
    fraction: float = 0.0
    message: str = ""
    code: Optional[int] = None


class DetectionProcess:
    """``sacdiff detect`` in a child process. ``poll()`` returns the events read so far; ``cancel()`` stops it."""

    def __init__(self, command: list[str], runDir: Path, workDir: Path, env: dict):
        self.command = command
        self.runDir = runDir
        self.workDir = workDir
        self.fraction = 0.0
        self.log: list[str] = []
        self.cancelled = False
        self._events: "queue.Queue[Event]" = queue.Queue()
        popen = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1,
                     encoding="utf-8", errors="replace")  # the library prints α, λ, ²: never the locale's codec
        if os.name == "posix":
            popen["start_new_session"] = True  # own process group: cancel reaches every child
        else:  # own process group, and no console window popping up
            popen["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self._process = subprocess.Popen(command, **popen)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        try:
            for line in self._process.stdout:
                for part in line.rstrip("\n").split("\r"):  # a tqdm bar may share the line
                    progress = parse_progress(part)
                    if progress is not None:
                        self._events.put(Event(EventKind.PROGRESS, fraction=progress[0], message=progress[1]))
                    elif part.strip():
                        self._events.put(Event(EventKind.LOG, message=part))
        except (OSError, ValueError) as exc:  # the pipe closed under us (cancel)
            self._events.put(Event(EventKind.LOG, message=f"[output reader stopped: {exc}]"))
        finally:
            self._process.stdout.close()
            self._events.put(Event(EventKind.EXIT, code=self._process.wait()))

    def poll(self) -> list[Event]:
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if event.kind is EventKind.PROGRESS:
                self.fraction = event.fraction
            elif event.kind is EventKind.LOG:
                self.log.append(event.message)
            events.append(event)

    @property
    def running(self) -> bool:
        return self._process.poll() is None or self._reader.is_alive()

    @property
    def returncode(self) -> Optional[int]:
        return None if self.running else self._process.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        self._process.wait(timeout)
        self._reader.join(timeout)
        return self._process.returncode

    def errorMessage(self) -> str:
        """The library's one-line error (``sacdiff: error: …``) or the last lines of output."""
        errors = [line for line in self.log if is_error_line(line)]
        return errors[-1] if errors else "\n".join(self.log[-5:]) or f"exit status {self._process.returncode}"

    def cancel(self):
        """Kill the process tree and remove the work folder; nothing reaches the scene."""
        self.cancelled = True
        if self._process.poll() is None:
            try:
                if os.name == "posix":
                    os.killpg(self._process.pid, signal.SIGKILL)
                else:  # PythonSlicer is a launcher: kill() would stop it and leave the real Python running
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True,
                                   creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            except ProcessLookupError:
                pass
        self.wait(30)
        self.cleanup()

    def cleanup(self):
        shutil.rmtree(self.workDir, ignore_errors=True)
