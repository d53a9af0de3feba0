#!/usr/bin/env bash
# s3.sh: full backup and restore times to a local MinIO against a local
# path, for the same images, and their ratios (issue 12 item 4).
#
# MinIO runs on 127.0.0.1 from the binary scripts/tools.sh builds, with its
# data directory on the same filesystem as the local-path repository; on a
# 2-core machine it competes with vmvault for the CPU, as a store on the
# backup host itself would.
#
# Usage: bench/s3.sh [--runs N] [--workdir DIR] [--vmvault BIN] IMAGE...
#   IMAGE          raw disk images (e.g. base.raw from bench/mkimage.sh)
#   --runs N       repeat each measurement N times (median reported; default 1)
#   --vmvault BIN  use this vmvault binary instead of building ./cmd/vmvault
#   --workdir DIR  repositories and MinIO's data (default under $TMPDIR or
#                  /var/tmp; on a tmpfs neither side pays for syncs)
# Prints the load average before and after, and one line per image and
# step: seconds on the local path, on S3, and the ratio, with the CPU
# seconds behind each (vmvault's, and MinIO's own for S3: on a 2-core
# machine the store's CPU is what the local path does not pay), and the
# floor: the ratio a client doing no more work than vmvault does on the
# local path would reach with MinIO's measured work beside it, every core
# busy all the time: max(local wall, (local CPU + MinIO CPU) / cores) ÷
# local wall. A target below the floor cannot be met on this machine
# whatever the client does.
set -euo pipefail
runs=1
workdir=
vmvault_bin=
images=()
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) runs=$2; shift 2 ;;
	--workdir) workdir=$2; shift 2 ;;
	--vmvault) vmvault_bin=$(realpath "$2"); shift 2 ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	-*) echo "s3.sh: unknown option $1" >&2; exit 2 ;;
	*) images+=("$1"); shift ;;
	esac
done
[ ${#images[@]} -gt 0 ] || { echo "s3.sh: give at least one image" >&2; exit 2; }
cd "$(dirname "$0")/.."
bash scripts/tools.sh
bin=${VMVAULT_TOOLS_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/vmvault-tools/bin}
[ -n "$workdir" ] || workdir=$(mktemp -d "${TMPDIR:-/var/tmp}/vmvault-s3bench.XXXXXX")
mkdir -p "$workdir"
minio_pid=
trap '[ -z "$minio_pid" ] || { kill "$minio_pid"; wait "$minio_pid"; } 2>/dev/null; rm -rf "$workdir"' EXIT
if [ -n "$vmvault_bin" ]; then cp "$vmvault_bin" "$workdir/vmvault"; else go build -o "$workdir/vmvault" ./cmd/vmvault; fi
printf 'bench password\n' >"$workdir/pw"
chmod 600 "$workdir/pw"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cport=$((port + 1))
export AWS_ACCESS_KEY_ID=benchadmin AWS_SECRET_ACCESS_KEY=benchadmin-secret-0123
MINIO_ROOT_USER=$AWS_ACCESS_KEY_ID MINIO_ROOT_PASSWORD=$AWS_SECRET_ACCESS_KEY MINIO_BROWSER=off MINIO_UPDATE=off MINIO_CI_CD=1 \
	"$bin/minio" server --quiet --address "127.0.0.1:$port" --console-address "127.0.0.1:$cport" "$workdir/minio" \
	>"$workdir/minio.log" 2>&1 </dev/null &
minio_pid=$!
for _ in $(seq 100); do
	curl -sf "http://127.0.0.1:$port/minio/health/cluster" && break
	sleep 0.2
done

# minio_cpu: MinIO's user+system CPU seconds so far.
minio_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$minio_pid/stat"; }
# timed FILE CMD...: appends "wall vmvault-cpu minio-cpu" seconds of CMD
# to FILE.
timed() {
	local out=$1; shift
	local m0 m1 w u s
	m0=$(minio_cpu)
	/usr/bin/time -f "%e %U %S" -o "$workdir/time" "$@"
	m1=$(minio_cpu)
	read -r w u s <"$workdir/time"
	echo "$w $(echo "$u + $s" | bc) $(echo "$m1 - $m0" | bc)" >>"$out"
}
# median FILE COLUMN
median() { awk -v c="$2" '{ print $c }' "$1" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

n=0
for img in "${images[@]}"; do
	n=$((n + 1))
	name=$(basename "$img")
	for round in $(seq "$runs"); do
		for kind in local s3; do
			case $kind in
			local) repo=$workdir/repo-local ;;
			s3) repo=s3:http://127.0.0.1:$port/bench$n-$round-$(echo "$name" | tr -c 'a-z0-9\n' '-') ;;
			esac
			rm -rf "$workdir/repo-local" "$workdir/cache"
			v=("$workdir/vmvault" --repo "$repo" --password-file "$workdir/pw" --cache-dir "$workdir/cache" -q)
			"${v[@]}" init >/dev/null
			cat "$img" >/dev/null # page cache: both read the same warm image
			timed "$workdir/$n.$name.$kind.backup" "${v[@]}" backup vm --source "$img"
			timed "$workdir/$n.$name.$kind.restore" sh -c '"$@" restore vm latest >/dev/null' sh "${v[@]}"
		done
	done
	for step in backup restore; do
		l=$(median "$workdir/$n.$name.local.$step" 1)
		s=$(median "$workdir/$n.$name.s3.$step" 1)
		lc=$(median "$workdir/$n.$name.local.$step" 2)
		sc=$(median "$workdir/$n.$name.s3.$step" 2)
		mc=$(median "$workdir/$n.$name.s3.$step" 3)
		floor=$(echo "f = ($lc + $mc) / $(nproc); if (f < $l) f = $l; f / $l" | bc -l)
		printf '%s %s: local %.1f s, s3 %.1f s, ratio %.2f (floor %.2f); cpu local %.1f s, s3 %.1f s + minio %.1f s\n' \
			"$name" "$step" "$l" "$s" "$(echo "$s / $l" | bc -l)" "$floor" "$lc" "$sc" "$mc"
	done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
