#!/usr/bin/env bash
# The README's first command twice on a fresh clone: how long a rerun with nothing changed takes.
#   bash bench/reruns.sh [BRANCH] [WORKDIR]      # default: the current branch, a new folder under /tmp
# Clones this repository, runs `bash scripts/setup.sh`, then `time .venv/bin/gist pipeline` twice and
# prints both wall times, their ratio and the second run's final lines (BENCHMARKS.md, *Reruns*).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
branch="${1:-$(git -C "$repo" rev-parse --abbrev-ref HEAD)}"
work="${2:-$(mktemp -d /tmp/gist-reruns-XXXXXX)}"
clone="$work/clone"

git clone --quiet --branch "$branch" "$repo" "$clone"
cd "$clone"
echo "commit $(git rev-parse --short HEAD) on $branch in $clone; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
bash scripts/setup.sh > "$work/setup.log" 2>&1
setup=$(python3 -c "print($(date +%s.%N) - $start)")

run() {  # run N: the wall time of `gist pipeline`, its output in $work/run-N.log
  local t0 t1
  t0=$(date +%s.%N)
  .venv/bin/gist pipeline > "$work/run-$1.log" 2>&1
  t1=$(date +%s.%N)
  python3 -c "print($t1 - $t0)"
}
first=$(run 1)
echo "load average after the first run: $(cut -d' ' -f1-3 /proc/loadavg)"
second=$(run 2)
echo "load average after the second run: $(cut -d' ' -f1-3 /proc/loadavg)"
printf 'setup %.1f s\nfirst gist pipeline %.1f s\nsecond gist pipeline %.1f s (%.1f%% of the first)\n' \
  "$setup" "$first" "$second" "$(python3 -c "print(100 * $second / $first)")"
echo "--- first run, last lines"
tail -n 6 "$work/run-1.log"
echo "--- second run, last lines"
tail -n 4 "$work/run-2.log"
