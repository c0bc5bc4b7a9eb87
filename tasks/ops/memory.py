"""Memory accounting for rank processes: anonymous RSS (what the OOM killer counts against us)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from types import TracebackType


def _status_kib(pid: int | str, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process is gone
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_anon_bytes(pid: int | str = "self") -> int:
    """Anonymous resident memory of a process (RssAnon), in bytes; 0 if it has exited."""
    return _status_kib(pid, "RssAnon") * 1024


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident memory (VmHWM, file-backed pages included), in bytes."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset this process's VmHWM so the next reading covers only what follows (Linux ≥ 4.0)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class PeakAnonSampler:
    """Samples RssAnon of this process in a background thread; `.peak` is the largest seen."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_anon_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakAnonSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())
