#!/usr/bin/env bash
# prune.sh: how long prune takes, and how much memory, on a repository with
# many generations of the reference image.
#
# Builds (or reuses) the reference image with bench/mkimage.sh, copies it to
# a work file, then makes GENERATIONS backups of it; before each backup it
# overwrites CHANGE_MIB MiB of random blocks at random offsets inside the
# work copy, so every generation has data of its own. Then it times
# `vmvault prune --keep-last KEEP` (wall, CPU, peak RSS) and reports the
# bytes reclaimed, and runs `check` to prove the result sound.
#
# Usage: bench/prune.sh [--size 4G] [--generations 100] [--keep 10]
#                       [--change-mib 8] [--quick] [--keep-workdir]
#   --quick  512M image, 30 generations: a smoke run
# Never fails on timings; fails when a vmvault command fails.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
size=4G gens=100 keep=10 change=8 quick= keepwd=
while [ $# -gt 0 ]; do
	case "$1" in
	--size) size=$2; shift 2 ;;
	--generations) gens=$2; shift 2 ;;
	--keep) keep=$2; shift 2 ;;
	--change-mib) change=$2; shift 2 ;;
	--quick) quick=1; size=512M; gens=30; shift ;;
	--keep-workdir) keepwd=1; shift ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "prune.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vmvault-bench"
mk=(--size "$size" --cache "$cache")
[ -z "$quick" ] || mk+=(--packages "" --random-mib 48 --log-mib 16 --db-mib 8 --tar-usr no)
imgdir=$("$repo_root/bench/mkimage.sh" "${mk[@]}")
[ -x /usr/bin/time ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null

work=$(mktemp -d "${TMPDIR:-/tmp}/vmvault-prune.XXXXXX")
[ -n "$keepwd" ] || trap 'rm -rf "$work"' EXIT
(cd "$repo_root" && go build -o "$work/vmvault" ./cmd/vmvault)
vmv=("$work/vmvault" --repo "$work/repo" --password-file "$work/pw" --cache-dir "$work/cache" -q)
(umask 077 && head -c 24 /dev/urandom | base64 >"$work/pw")
"${vmv[@]}" init >/dev/null 2>&1
cp --sparse=always "$imgdir/base.raw" "$work/disk.raw"
blocks=$(($(stat -c %s "$work/disk.raw") / 1048576))

start=$SECONDS
for i in $(seq 1 "$gens"); do
	for _ in $(seq 1 "$change"); do
		dd if=/dev/urandom of="$work/disk.raw" bs=1M count=1 seek=$(((RANDOM * 32768 + RANDOM) % (blocks - 1))) conv=notrunc status=none
	done
	at=$(date -u -d "2026-01-01 + $i hours" +%Y-%m-%dT%H:%M:%SZ)
	"${vmv[@]}" backup benchvm --source "$work/disk.raw" --time "$at" >/dev/null
	[ $((i % 10)) -ne 0 ] || echo "  $i/$gens generations ($((SECONDS - start)) s)" >&2
done
before=$(du -sb "$work/repo" | cut -f1)
/usr/bin/time -f '%e %U %S %M' -o "$work/prune.time" "${vmv[@]}" prune --keep-last "$keep" >/dev/null
after=$(du -sb "$work/repo" | cut -f1)
read -r wall user sys rss <"$work/prune.time"
"${vmv[@]}" check >/dev/null
echo
echo "prune of $gens generations of a $size image (keep last $keep, ${change} MiB changed per generation)"
echo "  load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  repository: $((before / 1048576)) MiB before, $((after / 1048576)) MiB after (reclaimed $(((before - after) / 1048576)) MiB)"
echo "  prune: wall ${wall} s, CPU $(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }') s, peak RSS $((rss / 1024)) MiB"
echo "  check after prune: ok"
