"""Max-min fair shares of one bound among users: the master's history (``--keep-mb``) and a slave's
compile cache both cut whoever keeps the most, never someone under their share."""
from __future__ import annotations


def level(sizes: list[int], keep: int) -> float:
    """How much each user may keep so that all of it fits in ``keep``: users under that level keep
    all of theirs, the rest are cut to it (inf: nothing to cut)."""
    if sum(sizes) <= keep:
        return float("inf")
    below = 0
    ordered = sorted(sizes)
    for n, size in enumerate(ordered):
        cut = (keep - below) / (len(ordered) - n)
        if size > cut:
            return max(cut, 0.0)
        below += size
    return float("inf")
