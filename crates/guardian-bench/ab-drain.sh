#!/usr/bin/env bash
# A/B of the per-op drain over loopback: runs prebuilt bench binaries in
# alternation, SETS times each, and prints medians per binary. One run's
# ratio swings by ±0.1, so a decision needs 20 sets or more.
#
#   cargo bench -p guardian-bench --no-run   # prints the binary's path
#   cp target/release/deps/all-<hash> /tmp/before   # per commit to compare
#   crates/guardian-bench/ab-drain.sh 20 /tmp/before /tmp/after
#
# Columns: c=1 and c=16 ratios (engine / bare reqwest), then CPU per op at
# c=16 in µs: the engine's server, outbox writer and client threads, and
# the bare loop's server and client. Writes nothing outside a temp dir.
set -euo pipefail

if [ $# -lt 2 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 SETS BENCH_BINARY..." >&2
    exit 2
fi
sets=$1
shift
for bin in "$@"; do
    [ -x "$bin" ] || { echo "$0: not an executable: $bin" >&2; exit 2; }
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for _ in $(seq "$sets"); do
    for bin in "$@"; do
        BENCH_OUT="$out/report.md" BENCH_RUNS=1 BENCH_DRAIN_PEROP=1 BENCH_ONLY=drain \
            "$bin" --bench 2>&1 | awk -v bin="$bin" '
            /engine c=16: cpu/ { es = $5; ew = $8; ec = $11 }
            /bare c=16: cpu/ { bs = $5; bc = $11 }
            /drain per-op run/ { r1 = $10; r16 = $16 }
            END {
                gsub(/[(),x]/, "", r1); gsub(/[(),x]/, "", r16)
                if (r16 == "") { print bin ": no per-op figures" > "/dev/stderr"; exit 1 }
                print bin, r1, r16, es, ew, ec, bs, bc
            }' >>"$out/rows"
    done
done

awk '
    {
        if (!($1 in n)) name[++k] = $1
        n[$1]++
        for (i = 2; i <= NF; i++) v[$1, i, n[$1]] = $i
    }
    function median(b, i,    m, j, t, a, c) {
        m = n[b]
        for (j = 1; j <= m; j++) a[j] = v[b, i, j] + 0
        for (j = 2; j <= m; j++) { t = a[j]; for (c = j - 1; c >= 1 && a[c] > t; c--) a[c + 1] = a[c]; a[c + 1] = t }
        return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
    }
    END {
        printf "%-28s %4s %6s %6s %7s %7s %7s %7s %7s\n", "binary", "runs", "c=1", "c=16", "srv", "writer", "client", "b.srv", "b.client"
        for (j = 1; j <= k; j++) {
            b = name[j]
            printf "%-28s %4d %6.3f %6.3f %7.1f %7.1f %7.1f %7.1f %7.1f\n", b, n[b], median(b, 2), median(b, 3), median(b, 4), median(b, 5), median(b, 6), median(b, 7), median(b, 8)
        }
    }' "$out/rows"
