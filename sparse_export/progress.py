"""Progress of long steps: a tqdm bar on a terminal, and plain lines every few percent when stderr is
not a terminal (a log file, a scheduler), so a long run never looks dead."""

import sys
import time

from tqdm import tqdm


class LogProgress:
    """The subset of tqdm's interface the steps use, printing 'desc: k/n (p%), elapsed, ~left' lines."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", every: float = 5.0, min_interval: float = 2.0,
                 stream=None, initial: int = 0):
        self.total, self.desc, self.unit, self.n, self.initial = total, desc, unit, initial, initial
        self.postfix = ""
        self.every, self.min_interval = every, min_interval
        self.stream = stream or sys.stderr
        self.t0 = self._last = time.monotonic()
        self._last_pct = -every

    def update(self, k: int = 1) -> None:
        self.n += k
        pct = 100.0 * self.n / max(self.total, 1)
        now = time.monotonic()
        if self.n >= self.total or (pct - self._last_pct >= self.every and now - self._last >= self.min_interval):
            self._line(now, pct)

    def _line(self, now: float, pct: float) -> None:
        spent = now - self.t0
        done = self.n - self.initial
        left = spent / done * (self.total - self.n) if done else 0.0
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%), {spent:.0f}s elapsed, "
              f"~{left:.0f}s left{', ' + self.postfix if self.postfix else ''}", file=self.stream, flush=True)
        self._last, self._last_pct = now, pct

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        pass

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0) -> "tqdm | LogProgress":
    """A tqdm bar on a terminal, LogProgress lines otherwise; a silent stand-in when not enabled."""
    if not enabled:
        return tqdm(total=total, desc=desc, unit=unit, disable=True, initial=initial)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial)
    return LogProgress(total, desc, unit, initial=initial)
