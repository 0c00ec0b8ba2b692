"""``python -m bench.profile <collapsed stacks>``: where a py-spy ``--format raw`` profile spends
its samples, as two tables — own time (the frame on top) and inclusive time (anywhere in the
stack) — restricted to frames of this project and the libraries it calls on its hot paths."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path


def summarise(path: Path, top: int = 30) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        frames = [frame.split(" (", 1)[0] + " " + frame.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
                  for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples", "", "own:"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 30))
