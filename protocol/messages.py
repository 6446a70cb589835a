"""Typed, immutable records for everything that travels between peers.

The records carry no behaviour beyond construction helpers; encoding lives in `protocol.codec`, signing in
`protocol.envelope`. Limits are part of the protocol: a receiver rejects anything outside them before use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1_000_000  # gossipsub drops larger frames silently (notes: 1,048,180 B); keep headroom

# Wire limits. Generous for real models, small enough that a hostile message cannot cost much.
MAX_NAME_CHARS = 128  # generator, swarm, model names, config keys
MAX_PEER_ID_CHARS = 128
MAX_CONFIG_ITEMS = 32
MAX_CONFIG_STR_CHARS = 256
MAX_ROLLOUTS = 256  # groups per batch
MAX_COMPLETIONS = 64  # completions per group
MAX_COMPLETION_CHARS = 16_384
MAX_ADDRS = 16
MAX_ADDR_CHARS = 256
MAX_INT = 2**63 - 1  # all ints are non-negative and fit int64
MAX_TIME = 2**40  # seconds since the epoch: far future but finite

ConfigValue = Union[bool, int, float, str]


@dataclass(frozen=True)
class TaskRef:
    """Names one verifiable task: any process rebuilds the same question and gold answer from it."""

    generator: str
    config: tuple[tuple[str, ConfigValue], ...]  # sorted by key, keys unique
    seed: int
    index: int

    @classmethod
    def make(cls, generator: str, config: Mapping[str, ConfigValue] | None, seed: int, index: int) -> "TaskRef":
        return cls(generator, tuple(sorted((config or {}).items())), seed, index)

    def config_dict(self) -> dict[str, ConfigValue]:
        return dict(self.config)


@dataclass(frozen=True)
class Rollout:
    """One question's group of completions, as plain text. `rewards` is the sender's opinion: informational only."""

    task: TaskRef
    completions: tuple[str, ...]
    rewards: tuple[float, ...] | None = None


@dataclass(frozen=True)
class RolloutBatch:
    sender: str  # libp2p peer ID string of the signer
    swarm: str
    version: int
    round: int  # sender's round
    created_at: float  # sender's wall clock, seconds since the epoch
    seq: int  # per-sender, strictly increasing, also across restarts (time-based)
    model: str
    rollouts: tuple[Rollout, ...]


@dataclass(frozen=True)
class Hello:
    """A small signed presence/status note: who I am, where to dial me, how far I am."""

    sender: str
    swarm: str
    version: int
    round: int
    created_at: float
    seq: int
    model: str
    listen_addrs: tuple[str, ...]


Message = Union[RolloutBatch, Hello]
