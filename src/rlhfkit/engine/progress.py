"""One progress style for every long loop (training, PPO, sampling, judging): a tqdm bar on a
terminal; in a log file or CI (stderr not a TTY) no bar, whose redraws would fill the log with
carriage returns, but one plain line every `every` steps and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Progress:
    """`update()` once per step; `set_postfix(loss=...)` shows the latest values (bar or line).
    `every`: steps per line without a terminal (default a tenth of `total`; 0: none, for a loop
    that prints its own lines)."""

    def __init__(self, total: int, desc: str, every: int | None = None, initial: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        self.total, self.desc, self.n = total, desc, initial
        self.every = max(1, total // 10) if every is None else every
        terminal = sys.stderr.isatty()
        self.lines = enabled and self.every > 0 and not terminal
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not (enabled and terminal))
        self.postfix: dict[str, Any] = {}
        self.t0 = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.n += n
        if self.lines and (self.n % self.every == 0 or self.n == self.total):
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.n}/{self.total} ({rate:.2f}/s{extra})", file=sys.stderr, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, every: int | None = None) -> Iterator[T]:
    """`for x in track(items, "generate")`: a `Progress` over an iterable (len() when it has one)."""
    n = total if total is not None else len(items)  # type: ignore[arg-type]
    with Progress(n, desc, every) as progress:
        for item in items:
            yield item
            progress.update()
