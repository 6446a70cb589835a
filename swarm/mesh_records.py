"""The mesh's plain records: its settings (MeshConfig), what it hands the node (Received), what stats() counts."""
from __future__ import annotations

from dataclasses import dataclass, field

from protocol.messages import PROTOCOL_VERSION, RolloutBatch

from .host import PUBSUB_STALL_S
from .shards import base_topic
from .validator import RateLimit


def topic_for(swarm: str, version: int = PROTOCOL_VERSION) -> str:
    """The single topic of an unsharded swarm (= shard 0 of 1); see swarm.shards for S > 1."""
    return base_topic(swarm, version)


@dataclass(frozen=True)
class MeshConfig:
    swarm: str
    listen: str = "/ip4/0.0.0.0/tcp/0"
    bootstrap: tuple[str, ...] = ()
    max_age_s: float = 900.0
    max_clock_skew_s: float = 60.0
    # What we accept from one sender (token buckets), sized to what a node absorbs (swarm.validator.RateLimit: ~22 ms
    # of CPU per MB received; 8 MB/s from one sender slowed rounds 3x). A node publishes one or a few batches a round.
    rate_msgs_per_s: float = 10.0
    rate_msgs_burst: float = 30.0
    rate_bytes_per_s: float = 1_000_000.0
    rate_bytes_burst: float = 4_000_000.0
    # What we accept from all senders together; beyond it, and while `incoming` is 3/4 full, messages are shed ("load")
    total_msgs_per_s: float = 100.0
    total_msgs_burst: float = 300.0
    total_bytes_per_s: float = 4_000_000.0
    total_bytes_burst: float = 16_000_000.0
    # What we send: half of what receivers accept, and a burst within a new sender's first second of budget there,
    # so pacing alone never trips their limit.
    publish_msgs_per_s: float = 5.0
    publish_bytes_per_s: float = 500_000.0
    publish_bytes_burst: float = 1_000_000.0
    heartbeat_s: float = 1.0
    hello_interval_s: float = 10.0
    mdns: bool = False
    max_peers: int = 32  # peer exchange stops dialing at this many connections
    incoming_capacity: int = 256  # Received batches buffered for the node; beyond that new ones are dropped
    replay_per_sender: int = 4096  # replay memory: a window in time (max_age_s), capped per sender (swarm.validator)
    strike_threshold: int = 10  # more rejections than this within strike_window_s -> disconnect + ban
    strike_window_s: float = 60.0
    ban_s: float = 600.0
    bootstrap_backoff_max_s: float = 30.0
    # Topic sharding (swarm.shards). shards is swarm-wide; 1 = one topic for everything, as before.
    shards: int = 1
    shard_fanin: int = 2  # shards listened to: home + (fanin - 1) rotating others (at most `shards`)
    shard_rotate_rounds: int = 10  # the rotating shards change every this many rounds
    # liveness: ping each connected peer every ping_interval_s (0: off); close it after ping_max_misses failures
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 15.0
    ping_max_misses: int = 3
    redial_after_s: float = 30.0  # discovery redials a lost peer it has heard from at most this often
    pubsub_stall_s: float = PUBSUB_STALL_S  # connected this long without a working pubsub link -> disconnect (0: off)
    # a batch waits at most this long for a peer on its topic when we are connected but to nobody on it yet
    # (just joined: discovery is still dialing our home shard), instead of being published into nothing
    publish_wait_s: float = 20.0
    receipts: str = ""  # a file to append a line per batch published / accepted to (swarm.receipts; "" = off)

    def rate(self) -> RateLimit:
        return RateLimit(self.rate_msgs_per_s, self.rate_msgs_burst, self.rate_bytes_per_s, self.rate_bytes_burst,
                         total_msgs_per_s=self.total_msgs_per_s, total_msgs_burst=self.total_msgs_burst,
                         total_bytes_per_s=self.total_bytes_per_s, total_bytes_burst=self.total_bytes_burst)


@dataclass(frozen=True)
class Received:
    batch: RolloutBatch
    from_peer: str  # the signer and libp2p publisher (not the forwarder)
    received_at: float  # wall clock
    size: int  # sealed envelope bytes
    via: str = ""  # the connected peer that handed it to us (the pool bounds young senders per connection)


@dataclass
class MeshCounters:
    accepted: int = 0
    accepted_hellos: int = 0
    published: int = 0
    published_hellos: int = 0
    bytes_in: int = 0
    bytes_in_hellos: int = 0  # the Hellos' part of bytes_in
    bytes_out: int = 0
    incoming_dropped: int = 0  # Received dropped because the node did not drain `incoming`
    oversize_dropped: int = 0  # our own rollouts too big for one message even alone
    bad_frames: int = 0  # peers that sent input that broke py-libp2p itself (banned at once)
    stalled_links: int = 0  # connections closed because their pubsub link was dead (swarm.host.StalledLinks)
    stalled_why: dict[str, int] = field(default_factory=dict)  # of those: no_stream / no_subscriptions / neither
    duplicates: int = 0
    bans: int = 0
    latency_ms: list[float] = field(default_factory=list)  # created_at -> received_at of recent batches
