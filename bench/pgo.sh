#!/usr/bin/env bash
# pgo.sh: regenerate cmd/vmvault/default.pgo, the CPU profile `go build`
# uses for profile-guided optimisation of vmvault (Go 1.21+ picks up a
# default.pgo in the main package's directory by itself).
#
# For each image directory given (bench/compare.sh's cache: base.raw,
# next.raw and, if present, blocks.raw), it backs up base, next and blocks
# into a fresh repository and restores the latest generation to
# /dev/null, each under VMVAULT_CPUPROFILE, and merges every profile into
# one. Give at least two different images, so the profile is not one
# image's.
#
# Usage: bench/pgo.sh IMAGEDIR [IMAGEDIR...]
#   e.g. bench/pgo.sh ~/.cache/vmvault-bench/images/4G-*
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bench/pgo.sh IMAGEDIR [IMAGEDIR...]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /var/tmp/vmvault-pgo.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The profile is of a build without one: it describes the code as written.
(cd "$root" && go build -pgo=off -o "$work/vmvault" ./cmd/vmvault)
printf 'pgo\n' >"$work/pw"
chmod 600 "$work/pw"
export VMVAULT_PASSWORD_FILE="$work/pw"
profiles=()
n=0
for dir in "$@"; do
	n=$((n + 1))
	export VMVAULT_REPOSITORY="$work/repo$n"
	"$work/vmvault" init >/dev/null
	for img in base next blocks; do
		[ -e "$dir/$img.raw" ] || continue
		cat "$dir/$img.raw" >/dev/null
		VMVAULT_CPUPROFILE="$work/$n-$img.prof" "$work/vmvault" backup pgovm --source "$dir/$img.raw" >/dev/null 2>&1
		profiles+=("$work/$n-$img.prof")
	done
	VMVAULT_CPUPROFILE="$work/$n-restore.prof" "$work/vmvault" restore pgovm latest >/dev/null 2>&1
	profiles+=("$work/$n-restore.prof")
	echo "pgo.sh: profiled $dir" >&2
done
go tool pprof -proto "${profiles[@]}" >"$root/cmd/vmvault/default.pgo"
echo "pgo.sh: wrote cmd/vmvault/default.pgo from ${#profiles[@]} profiles" >&2
