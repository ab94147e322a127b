#!/usr/bin/env python3
"""Plays the same HTTP/1.1 clients against nginx and against the crate's `watch_server`
example (watched, and not watched), and prints what each one logged or recorded, as one
markdown table. Started by `run.sh`, which starts the servers; Python 3 standard library only.

    compare.py NGINX_PORT NGINX_LOG WATCHED_PORT WATCHED_LOG UNWATCHED_PORT UNWATCHED_LOG

Each log gets one line per request: nginx's access log, and the crate servers' stdout (method,
recorded status, outcome, elapsed). Every client waits at most a few seconds; everything is on
127.0.0.1.
"""

import os
import socket
import struct
import sys
import time

# How long a client keeps its request in flight before it leaves: the servers' handlers run
# by then (`/slow` takes one second).
IN_FLIGHT = 0.3
# How long to wait for the lines a case should produce.
WAIT = 3.0


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset(sock):
    """Closes with SO_LINGER 0: an RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_until(sock, needle, limit=5.0):
    seen = b""
    deadline = time.monotonic() + limit
    while needle not in seen and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, OSError):
            break
        if not chunk:
            break
        seen += chunk
    return seen


def post(path, length, sent, extra=""):
    head = f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {length}\r\n{extra}\r\n"
    return head.encode() + b"x" * sent


GET_SLOW = b"GET /slow HTTP/1.1\r\nhost: localhost\r\n\r\n"
GET_FAST = b"GET /fast HTTP/1.1\r\nhost: localhost\r\n\r\n"


def leaves(request, how="fin"):
    """Sends `request`, waits while it is in flight, then leaves."""

    def play(port):
        sock = connect(port)
        sock.sendall(request)
        time.sleep(IN_FLIGHT)
        if how == "rst":
            reset(sock)
        else:
            sock.close()
        return 1

    return play


def idle_stream(request):
    def play(port):
        sock = connect(port)
        sock.sendall(request)
        read_until(sock, b"data: first")
        time.sleep(IN_FLIGHT)
        sock.close()
        return 1

    return play


def half_close(port):
    sock = connect(port)
    sock.sendall(GET_SLOW)
    time.sleep(IN_FLIGHT)
    sock.shutdown(socket.SHUT_WR)
    answer = read_until(sock, b"done")
    sock.close()
    half_close.saw[port] = "got its answer" if b"done" in answer else "got nothing"
    return 1


half_close.saw = {}


def pipelined(port):
    sock = connect(port)
    sock.sendall(GET_SLOW + GET_FAST)
    read_until(sock, b"fast")
    sock.close()
    return 2


def close_after_answer(port):
    sock = connect(port)
    sock.sendall(GET_FAST)
    read_until(sock, b"fast")
    sock.close()
    return 1


CASES = [
    ("GET, client closes (FIN) while waiting", leaves(GET_SLOW)),
    ("GET, client resets (RST) while waiting", leaves(GET_SLOW, "rst")),
    ("POST, 5-byte body unread, client closes", leaves(post("/slow", 5, 5))),
    ("POST, 64 KiB body unread, client closes", leaves(post("/slow", 65536, 65536))),
    ("POST, partial upload (64 KiB of 1 MiB), client closes", leaves(post("/slow", 1 << 20, 65536))),
    (
        "POST, `Expect: 100-continue`, client closes",
        leaves(post("/slow", 100000, 0, "expect: 100-continue\r\n")),
    ),
    (
        "POST, chunked body unread, client closes",
        leaves(
            b"POST /slow HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        ),
    ),
    (
        "GET, idle event stream, client closes",
        idle_stream(b"GET /stream HTTP/1.1\r\nhost: localhost\r\n\r\n"),
    ),
    ("POST, idle event stream, 64 KiB body unread, client closes", idle_stream(post("/stream", 65536, 65536))),
    ("GET, half-close (`shutdown(SHUT_WR)`) while waiting, then reads", half_close),
    ("two GETs pipelined, both answers read", pipelined),
    ("GET, whole answer read, then client closes", close_after_answer),
]


def new_lines(path, offset, count):
    """The lines written to `path` after `offset`, once there are `count` (or after WAIT)."""
    got, deadline = [], time.monotonic() + WAIT
    while time.monotonic() < deadline:
        with open(path, "rb") as log:
            log.seek(offset)
            got = log.read().decode().splitlines()
        if len(got) >= count:
            break
        time.sleep(0.05)
    return got


def crate(line):
    # "GET 499 client_disconnected 300.5ms" -> "499 client_disconnected (300 ms)"
    _method, status, kind, elapsed = line.split()
    return f"{status} `{kind}` ({float(elapsed[:-2]):.0f} ms)"


def nginx(line):
    # "GET 499 0.301 -" -> "499 (301 ms, upstream -)"
    _method, status, took, upstream = line.split()
    return f"{status} ({float(took) * 1000:.0f} ms, upstream {upstream})"


def cell(lines, render, note=""):
    text = "; ".join(render(line) for line in lines) if lines else f"nothing within {WAIT:.0f} s"
    return text + (f", {note}" if note else "")


def main():
    args = sys.argv[1:7]
    servers = {
        "nginx": (int(args[0]), args[1], nginx),
        "watched": (int(args[2]), args[3], crate),
        "unwatched": (int(args[4]), args[5], crate),
    }
    rows = []
    for name, play in CASES:
        row = [name]
        for port, log, render in servers.values():
            # Whatever came late from the case before is not this case's.
            time.sleep(0.1)
            offset = os.path.getsize(log)
            count = play(port)
            note = half_close.saw.pop(port, "")
            row.append(cell(new_lines(log, offset, count), render, note))
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr)
    print("| client | nginx 1.22 logs (`$status`, `$request_time`, `$upstream_status`) "
          "| tower-timeouts, watched | tower-timeouts, not watched |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
