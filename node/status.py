"""A node's live status on localhost: a dashboard page at /, JSON at /status and /history, and the client side that
`swarm-node status` uses.

A deliberately tiny HTTP/1.0 responder on trio: one GET, one document. It listens on 127.0.0.1 only — status
reveals nothing secret, but a node should not expose an extra public port by surprise. The page
(node/assets/dashboard.html) is one self-contained file with its own script and SVG charts: no CDN, so it works with no
internet, and it only polls the two JSON documents, which are built from counters the node already keeps (no request
ever waits on the round loop, which runs torch in worker threads).
"""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import trio

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
DASHBOARD = Path(__file__).with_name("assets") / "dashboard.html"
# a page elsewhere that rebinds its DNS name to 127.0.0.1 must not read us: only local Host names are served
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
HEADERS = ("Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
           "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:\r\n")


class StatusPortError(OSError):
    pass


@lru_cache(maxsize=1)
def dashboard_page() -> bytes:
    return DASHBOARD.read_bytes()


def _host_ok(headers: dict[str, str]) -> bool:
    host = headers.get("host")
    if host is None:  # an HTTP/1.0 client may send none
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.lower() in LOCAL_HOSTS


def respond(method: bytes, target: str, headers: dict[str, str], get_status: Callable[[], dict[str, Any]],
            get_history: Callable[[int], dict[str, Any]] | None = None) -> tuple[str, str, bytes]:
    """(status line, content type, body) for one request; pure, so it is tested without a socket."""
    try:
        url = urllib.parse.urlsplit(target)
    except ValueError:  # e.g. "//[x": not a URL at all
        return "400 Bad Request", "application/json", b'{"error": "bad request target"}'
    path, query = url.path, urllib.parse.parse_qs(url.query)
    if method not in (b"GET", b"HEAD"):
        return "405 Method Not Allowed", "application/json", b'{"error": "only GET"}'
    if not _host_ok(headers):
        return "403 Forbidden", "application/json", b'{"error": "status is served to local host names only"}'
    wants_json = "application/json" in headers.get("accept", "") and "text/html" not in headers.get("accept", "")
    if path == "/" and not wants_json:
        return "200 OK", "text/html; charset=utf-8", dashboard_page()
    if path in ("/", "/status"):  # "/" with Accept: application/json still answers JSON, as it did before the page
        return "200 OK", "application/json", json.dumps(get_status(), default=str).encode()
    if path == "/history":
        try:
            since = int(query.get("since", ["0"])[0])
        except ValueError:
            return "400 Bad Request", "application/json", b'{"error": "since must be a round number"}'
        doc = get_history(since) if get_history is not None else {"rows": [], "next": 0, "max_rows": 0}
        return "200 OK", "application/json", json.dumps(doc, default=str).encode()
    return "404 Not Found", "application/json", b'{"error": "not found; try GET / (the page) or GET /status"}'


async def serve_status(port: int, get_status: Callable[[], dict[str, Any]],
                       get_history: Callable[[int], dict[str, Any]] | None = None, *,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serves the dashboard and the status documents on 127.0.0.1:port. `get_history(since)`: the per-round rows
    from round `since` on (a relay has none)."""
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
                head_lines = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                parts = head_lines[0].split(b" ", 2)
                target = parts[1].decode("latin-1") if len(parts) > 1 else ""
                headers = {}
                for line in head_lines[1:]:
                    k, sep, v = line.decode("latin-1").partition(":")
                    if sep:
                        headers[k.strip().lower()] = v.strip()
                try:
                    code, ctype, body = respond(parts[0], target, headers, get_status, get_history)
                except Exception:  # a bug in building a document costs that request, never the node
                    log.exception("status request %r failed", target[:200])
                    code, ctype, body = "500 Internal Server Error", "application/json", b'{"error": "internal"}'
                head = (f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{HEADERS}"
                        "Connection: close\r\n\r\n")
                await stream.send_all(head.encode() + (b"" if parts[0] == b"HEAD" else body))
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
