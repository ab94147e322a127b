#!/usr/bin/env bash
# Instructions per request for each row of benches/instructions.rs, under valgrind's
# cachegrind: the difference between a run of 2N requests and one of N, divided by N, so that
# start-up cancels out. Deterministic: the same build gives the same figures on any run.
#
# usage: scripts/instructions.sh [N]   (default 100000; needs valgrind)
set -euo pipefail
n=${1:-100000}
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
bin=$(cargo bench --bench instructions --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "instructions" and m.get("executable"):
        print(m["executable"])')
ir() {
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null "$bin" "$@" 2>&1 |
        awk '/I *refs:/ { gsub(",", "", $NF); print $NF }'
}
echo "| row | ready: Ir/request | over bare | pending once: Ir/request | over bare |"
echo "|---|---:|---:|---:|---:|"
declare -A base
for row in bare tower_timeout tower_http_on_early_drop tower_http_pair ours_response_timeout ours_client_disconnect ours_full_stack; do
    line="| $row"
    for path in ready pending; do
        a=$(ir "$row" "$path" "$n")
        b=$(ir "$row" "$path" $((2 * n)))
        per=$(((b - a) / n))
        [[ $row == bare ]] && base[$path]=$per
        line="$line | $per | $((per - base[$path]))"
    done
    echo "$line |"
done
