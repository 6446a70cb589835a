"""The compact live view of a running node: a redrawn panel on a terminal, one plain line per round otherwise."""
from __future__ import annotations

import sys
from typing import Any, TextIO

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], lo: float = 0.0, hi: float = 1.0) -> str:
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, max(0, int((v - lo) / span * (len(SPARK) - 1) + 0.5)))] for v in values)


def trend(history: list[float], window: int = 20) -> float:
    """Mean of the last `window` rewards minus the mean of the `window` before them (0 until there are two windows)."""
    if len(history) < 2 * window:
        window = len(history) // 2
    if window == 0:
        return 0.0
    return sum(history[-window:]) / window - sum(history[-2 * window : -window]) / window


class LiveView:
    def __init__(self, stream: TextIO = sys.stdout, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.rewards: list[float] = []
        self._drawn = 0

    def line(self, m: dict[str, Any], rejected: int, target: int) -> str:
        r = m["round"] + 1
        return (
            f"round {r}{'/' + str(target) if target else ''}  reward {m['reward_mean']:.3f} "
            f"(trend {trend(self.rewards):+.3f})  peers {m['peers']}  "
            f"groups in {m['rollouts_in']} out {m['rollouts_out']}  trained {m['n_local']}+{m['n_external']}ext  "
            f"rejected {rejected}  {m['wall_s']:.2f}s/round"
        )

    def update(self, m: dict[str, Any], rejected: int = 0, target: int = 0) -> None:
        self.rewards.append(float(m["reward_mean"]))
        text = self.line(m, rejected, target)
        if not self.tty:
            print(text, file=self.stream, flush=True)
            return
        panel = [text, "reward " + sparkline(self.rewards[-60:])]
        if "heldout_acc" in m:
            panel.append(f"held-out greedy accuracy {m['heldout_acc']:.3f}")
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{p}\n" for p in panel))
        self.stream.flush()
        self._drawn = len(panel)

    def message(self, text: str) -> None:
        """A line that stays (addresses, warnings): printed above the panel."""
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        print(text, file=self.stream, flush=True)
