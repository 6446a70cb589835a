"""Liveness: ping every connected peer and drop the ones that stop answering.

A TCP connection whose far end vanished (power cut, a cut link, a hung process) looks alive until the kernel gives
up, which takes many minutes; until then gossipsub keeps it in its mesh and sends into it, and the peer still
counts in `peers` and `--min-peers`. Every `interval_s` we ping each connected peer (a yamux ping frame, or the
standard `/ipfs/ping/1.0.0` protocol on another muxer), and after `max_misses` consecutive failed pings we close the
connection. Discovery redials it later if it comes back.

On a yamux connection (every one between our nodes) a ping is a yamux ping frame, one each way (swarm.yamux_ping);
the stream ping, which opens a stream and negotiates its protocol (~3.5 ms of CPU per peer and cycle on both ends),
is kept for other muxers. A peer that sent us a message or a gossip control RPC since the last cycle has shown it is
alive, and is not pinged (`heard_at`), which leaves the pings to the quiet links, the ones that need them. A peer
that pings us is alive too (`hear_inbound_pings` for stream pings, `on_pinged` for yamux ones): on a quiet link the
end with the smaller peer ID pings and the other, which counts what it heard over 1.5 cycles, only answers (and pings
again if those pings stop), so each quiet link costs one ping per cycle instead of two.

A starved machine (a laptop running 8 nodes on 2 cores) answers pings late; that must not tear the mesh down. So the
defaults are lenient (3 misses of 15 s: a silent peer goes after ~45-75 s, not the kernel's ~15 min), and a cycle in
which our own event loop was late (its sleep overshot by more than `max_lag_s`) counts no misses: then we are the
slow one, and a late answer says nothing about the peer.
"""
from __future__ import annotations

import logging
import math
import random
from typing import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.host.ping import ID as PING_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.peer.id import ID

from .yamux_ping import is_yamux, on_pinged, yamux_ping

log = logging.getLogger(__name__)
JITTER = 0.1  # each cycle lasts interval_s x (1 +- JITTER)
LOOK_BACK = 0.5  # cycles further back the larger-ID end of a link counts what it heard (see hear_inbound_pings)


def hear_inbound_pings(host: IHost, heard: dict[ID, float]) -> None:
    """Record a peer opening a ping stream to us in `heard` (as a message from it would be), then answer as before."""
    answer = host.get_mux().handlers.get(PING_ID)
    if answer is None:
        return

    async def handle(stream: INetStream) -> None:
        heard[stream.muxed_conn.peer_id] = trio.current_time()
        await answer(stream)

    host.set_stream_handler(PING_ID, handle)


class Liveness:
    def __init__(self, host: IHost, *, interval_s: float = 10.0, timeout_s: float = 15.0, max_misses: int = 3,
                 max_lag_s: float = 5.0, on_dead: Callable[[ID], Awaitable[None]] | None = None,
                 heard_at: Callable[[ID], float | None] | None = None) -> None:
        self.host = host
        self.heard_at = heard_at  # peer -> trio time we last received something from it (None: never)
        self.interval_s, self.timeout_s, self.max_misses = interval_s, timeout_s, max_misses
        self.max_lag_s = max_lag_s
        self.on_dead = on_dead
        self.misses: dict[ID, int] = {}
        self.rtt_ms: dict[str, float] = {}  # peer -> last round trip
        self.dropped = 0  # connections closed for not answering
        self.lagged_cycles = 0  # cycles that counted no misses because our own loop was late
        self.pings_sent = 0
        self.pings_skipped = 0  # peers not pinged in a cycle because they had sent us something since the last one
        self._inflight: set[ID] = set()  # peers with a ping still running (possibly stuck)
        self._pinged_us: dict[ID, float] = {}  # peer -> trio time it last pinged us over yamux

    async def run(self) -> None:
        # Pings run as background tasks and the cycle waits for them only until the timeout: on a dead link a ping can
        # block inside py-libp2p past its own cancellation (a yamux write on a full send buffer), and a stuck ping must
        # count as a miss, not stall the whole check.
        async with trio.open_nursery() as background:
            while True:
                t0 = trio.current_time()
                # jittered, so two ends that started together drift apart and one of them sees the other's ping first
                wait = self.interval_s * random.uniform(1 - JITTER, 1 + JITTER)
                await trio.sleep(wait)
                lagged = trio.current_time() - t0 - wait > self.max_lag_s
                peers = list(self.host.get_connected_peers())
                self.misses = {p: n for p, n in self.misses.items() if p in peers}
                self._pinged_us = {p: t for p, t in self._pinged_us.items() if p in peers}
                for pid in peers:
                    self._hear_yamux_pings(pid)
                names = {p.to_base58() for p in peers}
                self.rtt_ms = {k: v for k, v in self.rtt_ms.items() if k in names}
                results: dict[ID, float | None] = {}
                waiting = []
                heard: set[ID] = set()
                me = self.host.get_id().to_bytes()
                for pid in peers:
                    if pid in self._inflight:  # the previous ping never came back: another miss
                        continue
                    at = self.heard_at(pid) if self.heard_at is not None else None
                    at = max(-math.inf if at is None else at, self._pinged_us.get(pid, -math.inf))
                    # it spoke during this cycle: alive, no ping needed. Of the two ends of a link, the one with the
                    # larger ID looks back half a cycle further, so the other's pings (one per cycle) always reach it
                    # in time and only one end pings a quiet link
                    since = t0 - (LOOK_BACK * self.interval_s if me > pid.to_bytes() else 0.0)
                    if at >= since:
                        heard.add(pid)
                        continue
                    self.pings_sent += 1
                    done = trio.Event()
                    waiting.append(done)
                    self._inflight.add(pid)
                    background.start_soon(self._ping_into, pid, results, done)
                t1 = trio.current_time()
                with trio.move_on_after(self.timeout_s + 1.0):
                    for done in waiting:
                        await done.wait()
                lagged = lagged or trio.current_time() - t1 - (self.timeout_s + 1.0) > self.max_lag_s
                if lagged:
                    self.lagged_cycles += 1
                self.pings_skipped += len(heard)
                for pid in peers:
                    if pid in heard:
                        self.misses.pop(pid, None)
                        continue
                    await self._count(pid, results.get(pid), lagged)

    async def _ping_into(self, pid: ID, results: dict[ID, float | None], done: trio.Event) -> None:
        try:
            results[pid] = await self.ping(pid)
        finally:
            self._inflight.discard(pid)
            done.set()

    async def _count(self, pid: ID, rtt: float | None, lagged: bool) -> None:
        if rtt is not None:
            self.misses.pop(pid, None)
            self.rtt_ms[pid.to_base58()] = rtt
            return
        if lagged:
            return
        self.misses[pid] = self.misses.get(pid, 0) + 1
        if self.misses[pid] >= self.max_misses:
            log.warning("peer %s did not answer %d pings; closing its connection", pid.to_base58(), self.misses[pid])
            self.misses.pop(pid, None)
            self.dropped += 1
            if self.on_dead is not None:
                await self.on_dead(pid)

    def _hear_yamux_pings(self, pid: ID) -> None:
        def heard() -> None:
            self._pinged_us[pid] = trio.current_time()

        for conn in self.host.get_network().get_connections(pid):
            if is_yamux(conn.muxed_conn):
                on_pinged(conn.muxed_conn, heard)

    async def ping(self, pid: ID) -> float | None:
        """Round trip in ms, or None if the peer did not answer within timeout_s."""
        muxed = [c.muxed_conn for c in self.host.get_network().get_connections(pid) if is_yamux(c.muxed_conn)]
        stream = None
        try:
            with trio.fail_after(self.timeout_s):
                if muxed:
                    return await yamux_ping(muxed[0])
                start = trio.current_time()
                stream = await self.host.new_stream(pid, [PING_ID])
                await perform_ping_roundtrip(stream)
                return (trio.current_time() - start) * 1000.0
        except (Exception, trio.TooSlowError) as e:
            log.debug("ping %s failed: %r", pid.to_base58(), e)
            return None
        finally:
            if stream is not None:
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    try:
                        await stream.close()
                    except Exception:
                        pass
