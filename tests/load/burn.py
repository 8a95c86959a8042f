"""CPU burners: processes that keep cores busy while a test runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_BURN = "while True: pass"


@contextmanager
def burning(cores: int = 1) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`cores` processes spinning on a core each, stopped on exit."""
    burners = [subprocess.Popen([sys.executable, "-c", _BURN]) for _ in range(cores)]
    try:
        yield burners
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()
