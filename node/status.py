"""A node's live status as JSON on localhost, and the client side that `swarm-node status` uses.

A deliberately tiny HTTP/1.0 responder on trio: one GET, one JSON document. It listens on 127.0.0.1 only — status
reveals nothing secret, but a node should not expose an extra public port by surprise.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Callable

import trio

MAX_REQUEST = 8192


class StatusPortError(OSError):
    pass


async def serve_status(port: int, get_status: Callable[[], dict[str, Any]], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    except OSError as e:
        raise StatusPortError(f"status port {port} is not available ({e.strerror or e})") from None

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
                    chunk = await stream.receive_some(1024)
                    if not chunk:
                        break
                    request += chunk
                parts = request.split(b" ", 2)
                path = parts[1].decode("latin-1") if len(parts) > 1 else ""
                if parts[0] == b"GET" and path in ("/", "/status"):
                    code, body = "200 OK", json.dumps(get_status(), default=str).encode()
                else:
                    code, body = "404 Not Found", b'{"error": "not found; try GET /status"}'
                head = f"HTTP/1.0 {code}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                await stream.send_all(head.encode() + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    task_status.started(port)
    await trio.serve_listeners(handle, listeners)


def fetch_status(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> dict[str, Any]:
    """Reads a node's status; raises ConnectionError with a clear sentence when no node answers."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"no swarm-node answered on {host}:{port} ({reason})") from None


def format_status(s: dict[str, Any]) -> str:
    """A readable summary of one node's status document."""
    if s.get("role") == "relay":
        return _format_relay(s)
    last = s.get("last_round") or {}
    hist = [r for _, r in s.get("reward_history", [])]
    recent = sum(hist[-20:]) / len(hist[-20:]) if hist else float("nan")
    first = sum(hist[:20]) / len(hist[:20]) if hist else float("nan")
    rej = s.get("rejections", {})
    pool = s.get("pool", {})
    tp = s.get("throughput", {})
    lines = [
        f"node     {s.get('peer_id')}  swarm={s.get('swarm')}  model={s.get('model')}",
        f"listen   {', '.join(s.get('listen_addrs', [])[:2]) or '(offline)'}",
        f"round    {s.get('round')}" + (f" / {s['rounds_target']}" if s.get("rounds_target") else "")
        + f"   reward {last.get('reward_mean', float('nan')):.3f}  (first 20: {first:.3f}, last 20: {recent:.3f})",
        f"peers    {len(s.get('peers', []))}   pool {pool.get('groups', 0)} groups   "
        f"in/out {tp.get('rollouts_in', 0)}/{tp.get('rollouts_out', 0)} groups   {tp.get('rounds_per_min', 0)} rounds/min",
        "rejected " + (", ".join(f"{k}={v}" for k, v in sorted(rej.items()) if v) or "none"),
    ]
    return "\n".join(lines)


def _format_relay(s: dict[str, Any]) -> str:
    rej = s.get("rejections", {})
    proc = s.get("process", {})
    return "\n".join([
        f"relay    {s.get('peer_id')}  swarm={s.get('swarm')}",
        f"listen   {', '.join(s.get('listen_addrs', [])[:2])}",
        f"peers    {len(s.get('peers', []))}   batches relayed {s.get('batches_seen', 0)} from "
        f"{len(s.get('received_from', {}))} senders   up {s.get('uptime_s', 0):.0f}s",
        f"process  {proc.get('rss_mb')} MB resident, {proc.get('cpu_s')} s CPU",
        "rejected " + (", ".join(f"{k}={v}" for k, v in sorted(rej.items()) if v) or "none"),
    ])
