"""Liveness pings as yamux ping frames instead of a ping stream.

A `/ipfs/ping/1.0.0` ping opens a stream: SYN, a multistream-select negotiation each way, 32 bytes out and back, FIN
both ways, a handler task on the far end; a dozen Noise records and socket writes for one round trip. With pings off,
32 idle relays (`--max-peers 8`) spent 10.0 ms/s each instead of 15.6 (docs/scale.md, session 10): a third of an
idle node's CPU was pings. The yamux spec has its own ping (a 12-byte header, TYPE_PING with SYN, answered with ACK
by the far end's read loop; go-yamux and py-libp2p 0.8.1 both answer it, and 0.8.1 already sends one every 30 s per
connection to measure RTT): one frame each way and no stream.

py-libp2p 0.8.1 has no API for it: its pong handler sets `Yamux._ping_event`, the RTT loop's current event, whatever
ping the pong answers. `install_yamux_pings()` makes that attribute a property whose `set()` also wakes every
liveness ping waiting on the connection (a pong proves the far end's read loop is alive, whichever ping it answers),
and calls the connection's `on_pinged` hook when we answer the far end's ping, so a peer that pings us counts as
heard from (swarm.liveness: on a quiet link only one end pings).
"""
from __future__ import annotations

import struct
from typing import Any, Callable

import trio

_HOOK = "_swarm_on_pinged"  # Yamux instance attribute: called when we answer the far end's ping
_WAITERS = "_swarm_pong_waiters"  # Yamux instance attribute: events of liveness pings waiting for a pong
_RTT_EVENT = "_swarm_rtt_event"  # Yamux instance attribute: the RTT loop's own event
_HEADER_SIZE, _TYPE_PING = 12, 0x2  # the yamux spec's header (version, type, flags, stream ID, length) and ping type


def _yamux() -> Any:
    from libp2p.stream_muxer.yamux import yamux

    return yamux


class _PongEvent:
    """Stands in for the RTT loop's trio.Event: `set()` (a pong arrived) wakes it and every waiting liveness ping."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def set(self) -> None:
        d = self.conn.__dict__
        d[_RTT_EVENT].set()
        for ev in d.pop(_WAITERS, ()):
            ev.set()

    async def wait(self) -> None:
        await self.conn.__dict__[_RTT_EVENT].wait()


def ping_flags(data: bytes) -> int | None:
    """The flags of a yamux ping frame (SYN: a ping, ACK: a pong), or None for any other frame."""
    if len(data) == _HEADER_SIZE and data[1] == _TYPE_PING:
        return int.from_bytes(data[2:4], "big")
    return None


def install_yamux_pings() -> None:
    """Idempotent. See the module doc."""
    y = _yamux()
    if getattr(y.Yamux, "_swarm_pings", False):
        return

    def get_event(self: Any) -> _PongEvent:
        if _RTT_EVENT not in self.__dict__:  # a connection made before the install kept its event as a plain attribute
            self.__dict__[_RTT_EVENT] = self.__dict__.pop("_ping_event", None) or trio.Event()
        return _PongEvent(self)

    def set_event(self: Any, ev: trio.Event) -> None:
        self.__dict__[_RTT_EVENT] = ev

    write_frame = y.Yamux._write_frame

    async def write_frame_noting_pongs(self: Any, data: bytes) -> None:
        # the read loop answers a ping (TYPE_PING with ACK, stream 0) through here and nowhere else
        if (ping_flags(data) or 0) & y.FLAG_ACK:
            hook = self.__dict__.get(_HOOK)
            if hook is not None:
                hook()
        await write_frame(self, data)

    y.Yamux._ping_event = property(get_event, set_event)
    y.Yamux._write_frame = write_frame_noting_pongs
    y.Yamux._swarm_pings = True


def is_yamux(muxed_conn: Any) -> bool:
    return isinstance(muxed_conn, _yamux().Yamux) and getattr(type(muxed_conn), "_swarm_pings", False)


def on_pinged(muxed_conn: Any, hook: Callable[[], None]) -> None:
    """Call `hook` each time the far end pings this connection (and we answer)."""
    muxed_conn.__dict__[_HOOK] = hook


async def yamux_ping(muxed_conn: Any) -> float:
    """One ping frame; the round trip in ms once the pong is back. The caller bounds the wait (a dead link never
    answers; a write into a full send buffer can block too)."""
    y = _yamux()
    ev = trio.Event()
    muxed_conn.__dict__.setdefault(_WAITERS, []).append(ev)
    try:
        muxed_conn._ping_id = (muxed_conn._ping_id + 1) & 0xFFFFFFFF
        header = struct.pack(y.YAMUX_HEADER_FORMAT, 0, y.TYPE_PING, y.FLAG_SYN, 0, muxed_conn._ping_id)
        start = trio.current_time()
        await muxed_conn._write_frame(header)
        # 0.8.1's pong handler computes its RTT estimate from this (the window auto-tuning reads it); without it the
        # estimate would take in the time since the RTT loop's last ping
        muxed_conn._ping_sent_time = trio.current_time()
        await ev.wait()
        return (trio.current_time() - start) * 1000.0
    finally:
        waiters = muxed_conn.__dict__.get(_WAITERS)
        if waiters and ev in waiters:
            waiters.remove(ev)
