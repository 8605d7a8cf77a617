#!/usr/bin/env bash
# The file-defined shop (domains/shop-as-files) against the compiled shop on the same log, in the
# same run: one history seeded into `reproject dev-broker` (a process of its own, as a production
# broker is), then `rebuild --all` of each domain into its own database, alternating, ROUNDS times.
# Prints each round, the medians, the ratio, and whether every table of the two databases holds the
# same rows (md5 over every row in key order).
#
#   benches/files_vs_compiled.sh [EVENTS=10000000] [ROUNDS=3]
#
# Needs a release build (cargo build --release) and PostgreSQL at DATABASE_SERVER
# (default postgres://postgres@127.0.0.1:5432).
set -euo pipefail
cd "$(dirname "$0")/.."

events=${1:-10000000}
rounds=${2:-3}
server=${DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}
port=${BENCH_BROKER_PORT:-19097}
bin=target/release/reproject
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 2; }

# 128 partitions hold 10M events within the mock cluster's 5 MiB per partition.
"$bin" dev-broker --port "$port" --partitions 128 --quiet &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
export REPROJECT_BROKERS=127.0.0.1:$port
for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done

psql_in() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -t -A -v ON_ERROR_STOP=1 "$server/$1" -c "$2"; }
fresh() {
  psql_in postgres "DROP DATABASE IF EXISTS $1 WITH (FORCE)"
  psql_in postgres "CREATE DATABASE $1"
}

fresh files_bench_seed
start=$(date +%s.%N)
DATABASE_URL=$server/files_bench_seed "$bin" seed --events "$events" --quiet >/dev/null
echo "seeded $events events in $(echo "$(date +%s.%N) - $start" | bc) s"

declare -A took
for round in $(seq 1 "$rounds"); do
  for domain in compiled files; do
    db=files_bench_$domain
    fresh "$db"
    args=(rebuild --all --quiet)
    [ "$domain" = files ] && args=(--domain domains/shop-as-files "${args[@]}")
    start=$(date +%s.%N)
    DATABASE_URL=$server/$db "$bin" "${args[@]}" >/dev/null
    took[$domain,$round]=$(echo "$(date +%s.%N) - $start" | bc)
    printf 'round %d  %-8s %6.2f s  %8.0f events/s\n' "$round" "$domain" \
      "${took[$domain,$round]}" "$(echo "$events / ${took[$domain,$round]}" | bc -l)"
  done
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
compiled=$(median $(for r in $(seq 1 "$rounds"); do echo "${took[compiled,$r]}"; done))
files=$(median $(for r in $(seq 1 "$rounds"); do echo "${took[files,$r]}"; done))
printf 'median   compiled %6.2f s (%.0f events/s)   files %6.2f s (%.0f events/s)\n' \
  "$compiled" "$(echo "$events / $compiled" | bc -l)" "$files" "$(echo "$events / $files" | bc -l)"
printf 'files at %.1f%% of compiled throughput\n' "$(echo "100 * $compiled / $files" | bc -l)"

# The same rows in both: every table of the stable schema, md5 over its rows in key order.
same=yes
for table in $(psql_in files_bench_compiled "SELECT table_name FROM information_schema.views WHERE table_schema = 'public' ORDER BY 1"); do
  sum() { psql_in "$1" "SELECT count(*) || ' ' || md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM public.\"$table\" t"; }
  a=$(sum files_bench_compiled) b=$(sum files_bench_files)
  echo "$table: compiled $a, files $b"
  [ "$a" = "$b" ] || same=no
done
echo "tables identical: $same"
[ "$same" = yes ]
