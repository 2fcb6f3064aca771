"""The reference server's bookkeeping of sessions and of the open round."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from engine.server.aggregator import FedAvgAccumulator

__all__ = ["Round", "Site"]


@dataclass
class Site:
    """A registered site's session (its token, where it calls from, when last heard)."""

    name: str
    token: str
    ip: str
    last_seen: float
    joined: float


@dataclass
class Round:
    """One round's state while it is open: its running average and who sent, is sending, refused."""

    number: int
    accumulator: FedAvgAccumulator
    contributions: dict[str, str] = field(default_factory=dict)  # site -> contribution id
    receiving: dict[str, str] = field(default_factory=dict)  # contribution id -> site, in flight
    expected: set[str] = field(default_factory=set)  # sites that fetched this round's model
    min_reached_at: float | None = None
    closing: bool = False  # aggregated, being saved: no more contributions
    # Sites whose contribution was refused (site -> why): the round does not wait for them.
    refused: dict[str, str] = field(default_factory=dict)
    # Contributions left out of a round taken again (id -> why): a resend of one is refused.
    refused_ids: dict[str, str] = field(default_factory=dict)
    # site -> variable -> the peak of its model (global + Δ) as a fraction of the dtype's range:
    # what tells which contributions made an average overflow.
    peaks: dict[str, dict[str, float]] = field(default_factory=dict)
    retakes: int = 0  # times this round was taken again
    # Set when the next round's model is there (or the server stops): the sites that have
    # contributed wait on this, so a contribution wakes nobody and a round close wakes each
    # waiting site once (a shared condition woke all N waiters per contribution: N² a round).
    advanced: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
