"""Progress bars that read well in a terminal and in a log.

In a terminal a bar redraws in place (rate, ETA). Off a terminal (``make demo > demo.log``, CI) every redraw is a
new line, so bars redraw at most every ``KNOWSERVE_PROGRESS_SECONDS`` (default 10) and library bars
(transformers' loading and conversion bars, datasets' map bars) are switched off.
"""

from __future__ import annotations

import os
import sys


def interactive() -> bool:
    """True when progress goes to a terminal."""
    return sys.stderr.isatty()


def log_interval() -> float:
    """Seconds between redraws of a bar off a terminal."""
    return float(os.environ.get("KNOWSERVE_PROGRESS_SECONDS", "10"))


class _Lines:
    """A stream for bars off a terminal: each redraw becomes one line; bare carriage returns and newlines (tqdm's
    in-place redraw and close) are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.strip("\r\n")
        if s.strip():
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kwargs):
    """A tqdm bar (rate and ETA). In a terminal it redraws in place; off a terminal it writes one line at most
    every :func:`log_interval` seconds (``set_postfix`` included), plus the final line."""
    import time

    from tqdm import tqdm

    if interactive():
        return tqdm(iterable, **kwargs)

    class LogBar(tqdm):
        _printed = 0.0

        def display(self, msg=None, pos=None):
            now = time.monotonic()
            if msg is None and not self.disable and now - self._printed < log_interval():
                return True  # rate-limited; closing (disable is set) always prints the final line
            self._printed = now
            return super().display(msg, pos)

    kwargs.setdefault("mininterval", log_interval())
    kwargs.setdefault("maxinterval", max(log_interval(), 10.0))
    kwargs.setdefault("ncols", 100)
    kwargs.setdefault("ascii", True)
    kwargs.setdefault("file", _Lines(sys.stderr))
    return LogBar(iterable, **kwargs)


def quiet_library_bars() -> None:
    """Off a terminal, switch off the bars of transformers, datasets and the HF hub (one line per redraw)."""
    if interactive():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def console():
    """A rich Console: the terminal's width in a terminal, 120 columns in a log (rich's default there is 80,
    which cuts addresses and paths in tables)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS", "120")))
