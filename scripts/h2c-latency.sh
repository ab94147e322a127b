#!/usr/bin/env bash
# The gateway example's per-request latency over h2c and HTTP/1.1: 500 sequential requests on
# one connection, three runs each, with h2load (Debian: `apt-get install -y nghttp2-client`).
# The README's TCP_NODELAY figures come from this script. Everything runs on 127.0.0.1.
#
#   scripts/h2c-latency.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v h2load >/dev/null || { echo "h2load is not installed: apt-get install -y nghttp2-client" >&2; exit 1; }
cargo build --release --features axum --example gateway --example watch_server --manifest-path "$root/Cargo.toml"
bin="$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release/examples"

read -r upstream_port gateway_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
"$bin/watch_server" "127.0.0.1:$upstream_port" --no-watch >/dev/null 2>&1 & upstream=$!
RUST_LOG=warn "$bin/gateway" "http://127.0.0.1:$upstream_port" "127.0.0.1:$gateway_port" >/dev/null 2>&1 & gateway=$!
trap 'kill $upstream $gateway 2>/dev/null || true' EXIT
for port in "$upstream_port" "$gateway_port"; do
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.1)" 2>/dev/null && break
        sleep 0.1
    done
done

for protocol in h2c http/1.1; do
    flag=()
    [[ $protocol == http/1.1 ]] && flag=(--h1)
    for run in 1 2 3; do
        h2load "${flag[@]}" -n 500 -c 1 -m 1 "http://127.0.0.1:$gateway_port/fast" 2>/dev/null \
            | awk -v p="$protocol" -v r="$run" '/time for request:/ {print p, "run", r, "min", $4, "max", $5, "mean", $6, "sd", $7}'
    done
done
