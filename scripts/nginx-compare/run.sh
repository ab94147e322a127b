#!/usr/bin/env bash
# Plays the same HTTP/1.1 clients against nginx (a reverse proxy in front of a slow upstream)
# and against the crate's `watch_server` example, watched and not, and prints what each logged
# or recorded as one markdown table (the README's "Side by side with nginx").
#
#   scripts/nginx-compare/run.sh
#
# Needs nginx on PATH (Debian: `apt-get install -y nginx-light`). Everything runs on 127.0.0.1
# and stops when the script ends. Not part of `cargo test`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
nginx_bin="$(command -v nginx || true)"
[[ -x /usr/sbin/nginx ]] && nginx_bin=/usr/sbin/nginx
if [[ -z "$nginx_bin" ]]; then
    echo "nginx is not installed: apt-get install -y nginx-light" >&2
    exit 1
fi

cargo build --release --features axum --example watch_server --manifest-path "$root/Cargo.toml"
server="$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/watch_server"

work="$(mktemp -d)"
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Free ports on loopback, chosen by the kernel.
read -r nginx_port watched_port unwatched_port upstream_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

"$server" "127.0.0.1:$watched_port" > "$work/watched.log" 2>/dev/null & pids+=($!)
"$server" "127.0.0.1:$unwatched_port" --no-watch > "$work/unwatched.log" 2>/dev/null & pids+=($!)
"$server" "127.0.0.1:$upstream_port" --no-watch > "$work/upstream.log" 2>/dev/null & pids+=($!)
sed -e "s/NGINX_PORT/$nginx_port/" -e "s/UPSTREAM_PORT/$upstream_port/" \
    "$here/nginx.conf" > "$work/nginx.conf"
touch "$work/access.log"
"$nginx_bin" -p "$work" -c "$work/nginx.conf" & pids+=($!)

# Wait (at most 10 s) until every server answers.
for port in "$nginx_port" "$watched_port" "$unwatched_port"; do
    for _ in $(seq 100); do
        if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.1)" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
done

"$nginx_bin" -v
python3 "$here/compare.py" \
    "$nginx_port" "$work/access.log" \
    "$watched_port" "$work/watched.log" \
    "$unwatched_port" "$work/unwatched.log"
