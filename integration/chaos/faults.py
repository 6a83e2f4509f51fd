"""The fault kinds, what a fault records, and each kind's recovery rule.

A :class:`Fault` is one injected fault: its kind, its target (a peer id, a
ZooKeeper server, ``elasticsearch``), when it began and when it was healed (epoch
seconds). :data:`RULES` says, per kind, from which of those two instants recovery
is measured and within which bound (a function of the session timeout ``S``, or
None when the figure is reported without a bound).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Reference = Literal["start", "end"]

KINDS = (
    "kill-leader",
    "kill-follower",
    "pause-leader-short",
    "pause-follower-short",
    "pause-leader-long",
    "pause-follower-long",
    "zk-kill-leader",
    "zk-kill-follower",
    "zk-rolling-restart",
    "partition-leader",
    "partition-follower",
    "es-kill",
    "clock-step",
)
# Faults after which the target peer must start nothing once its session is gone.
CUTOFF_KINDS = frozenset(
    {
        "pause-leader-short",
        "pause-follower-short",
        "pause-leader-long",
        "pause-follower-long",
        "partition-leader",
        "partition-follower",
    }
)
SHORT_PAUSE_S = 2.0
EXTRA_S = 3.0  # long pauses and partitions last S + EXTRA_S


@dataclass(frozen=True)
class Rule:
    """Recovery is measured from ``reference``; ``bound_s(S)`` seconds at most (None: none)."""

    reference: Reference
    over_session: bool  # the bound is S + 1 s (a leader must be replaced) instead of 1 s
    bounded: bool = True

    def bound_s(self, session_s: float) -> float | None:
        if not self.bounded:
            return None
        return session_s + 1.0 if self.over_session else 1.0


RULES: dict[str, Rule] = {
    "kill-leader": Rule("start", over_session=True),
    "kill-follower": Rule("start", over_session=False),
    "pause-leader-short": Rule("end", over_session=False),
    "pause-follower-short": Rule("end", over_session=False),
    "pause-leader-long": Rule("start", over_session=True),
    "pause-follower-long": Rule("start", over_session=False),
    "zk-kill-leader": Rule("start", over_session=False),
    "zk-kill-follower": Rule("start", over_session=False),
    "zk-rolling-restart": Rule("start", over_session=False),
    "partition-leader": Rule("start", over_session=True),
    "partition-follower": Rule("start", over_session=False),
    "es-kill": Rule("start", over_session=False),
    "clock-step": Rule("start", over_session=False, bounded=False),
}


@dataclass
class Fault:
    """One injected fault. ``end`` is None until it is healed."""

    kind: str
    target: str
    start: float
    end: float | None = None
    note: str = ""

    def reference(self) -> float:
        """The instant recovery is measured from (the heal instant for a short pause)."""
        if RULES[self.kind].reference == "end" and self.end is not None:
            return self.end
        return self.start

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        return cls(**data)


def parse_kinds(text: str | None) -> list[str]:
    """The kinds named in ``a,b,c`` (all kinds for None or ""); ValueError for an unknown one."""
    if not text:
        return list(KINDS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in RULES]
    if unknown:
        raise ValueError(f"unknown nemesis kind(s) {unknown}; known: {', '.join(KINDS)}")
    return kinds
