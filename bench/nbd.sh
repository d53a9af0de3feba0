#!/usr/bin/env bash
# nbd.sh: `vmvault serve` against `vmvault restore` on the same repository.
#
# Builds vmvault, backs up each IMAGE (without one: a synthetic image of
# --size-mib, random data, a zero run, compressible text) into a fresh local
# repository, then reports, each the median of --runs interleaved rounds
# with a fresh server (cold reader cache; the page cache is warm for all):
#   restore   vmvault restore VM latest > /dev/null
#   pipe      vmvault restore VM latest | cat > /dev/null: a second baseline
#             in which restore's output, like a server's, must reach a reader
#   convert   qemu-img convert of the NBD export to qemu's null device (skips holes
#             through block status, as a client copying a disk does)
#   seqread   qemu-img bench: sequential 2 MiB reads of every byte of the
#             export, 8 in flight (holes included)
# and the ratios of restore's time to each (target: ≥ 0.8), with per round
# the CPU seconds of vmvault (user + system) and the load average. Then it adds
# --generations generations of a small VM and reports the time from
# starting `vmvault serve` to the first byte read through NBD (target: < 1 s).
# Timings never fail the script; a failed command or a wrong byte does.
#
# --rt runs every timed command at real-time round-robin priority (chrt -r 10),
# as bench/fuse.sh --rt does.
#
# --vmvault BIN measures that binary instead of building the checkout (to
# compare two builds in the same hour, as bench/fuse.sh --vmvault does).
#
# Usage: bench/nbd.sh [IMAGE...] [--size-mib N] [--runs N] [--generations N] [--rt] [--vmvault BIN] [--keep]
set -euo pipefail

size_mib=1024
runs=3
gens=100
keep=no
images=()
rt=()
vmvault_bin=
while (($#)); do
	case $1 in
	--size-mib) size_mib=$2; shift 2 ;;
	--runs) runs=$2; shift 2 ;;
	--generations) gens=$2; shift 2 ;;
	--rt) rt=(chrt -r 10); shift ;;
	--vmvault) vmvault_bin=$2; shift 2 ;;
	--keep) keep=yes; shift ;;
	-*) echo "nbd.sh: unknown option $1" >&2; exit 2 ;;
	*) images+=("$1"); shift ;;
	esac
done
[ -x /usr/bin/time ] || { echo "nbd.sh: needs GNU time (/usr/bin/time)" >&2; exit 1; }
for t in qemu-img go; do
	command -v "$t" >/dev/null || { echo "nbd.sh: $t not found (scripts/deps.sh installs qemu-utils)" >&2; exit 1; }
done
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/vmvault-nbd-bench.XXXXXX")
server=
cleanup() {
	[ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
	[ "$keep" = yes ] && echo "work dir kept: $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
say() { echo "nbd.sh: $*" >&2; }

if [ -n "$vmvault_bin" ]; then cp "$vmvault_bin" "$work/vmvault"; else (cd "$root" && go build -o "$work/vmvault" ./cmd/vmvault); fi
printf 'bench password\n' >"$work/pw"
chmod 600 "$work/pw"
vvargs=(--repo "$work/repo" --password-file "$work/pw" --cache-dir "$work/cache" -q)
vv() { "$work/vmvault" "${vvargs[@]}" "$@"; }

if ((${#images[@]} == 0)); then
	img=$work/disk.raw
	q=$((size_mib / 4))
	say "image: $size_mib MiB (half random, a quarter zeros, a quarter text)"
	head -c $((2 * q))M /dev/urandom >"$img"
	truncate -s $((3 * q))M "$img"
	(set +o pipefail; yes 'Nov 30 02:00:01 host kernel: a log line that compresses well' | head -c $((q))M >>"$img")
	images=("$img")
fi

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
load() { cut -d' ' -f1 /proc/loadavg; }

# start_server starts serve on $work/s.sock and waits until it accepts.
start_server() {
	rm -f "$work/s.sock"
	# The binary itself in the background, not the vv function: $! must be
	# vmvault's PID, not a subshell's.
	"${rt[@]}" "$work/vmvault" "${vvargs[@]}" serve "$@" --listen "unix:$work/s.sock" 2>>"$work/serve.log" &
	server=$!
	until [ -S "$work/s.sock" ]; do sleep 0.005; done
}
stop_server() {
	kill "$server"
	wait "$server" || { echo "nbd.sh: serve failed; see $work/serve.log" >&2; exit 1; }
	server=
}
url="nbd+unix:///?socket=$work/s.sock"
# server_cpu prints the serve process's CPU seconds so far (user + system).
server_cpu() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$server/stat"; }

for img in "${images[@]}"; do
	name=$(basename "$(dirname "$img")")/$(basename "$img")
	rm -rf "$work/repo" "$work/cache"
	vv init --kdf-params t=1,m=8192,p=1 >/dev/null 2>&1
	say "$name: backing up"
	vv backup vm01 --source "disk=$img" >/dev/null
	want=$(sha256sum <"$img" | cut -d' ' -f1)
	size=$(stat -c %s "$img")
	vv restore vm01 latest | sha256sum | grep -q "$want" || { echo "nbd.sh: restore differs" >&2; exit 1; }
	start_server vm01 latest
	qemu-img convert -f raw -O raw "$url" "$work/copy.raw"
	stop_server
	[ "$(sha256sum <"$work/copy.raw" | cut -d' ' -f1)" = "$want" ] || { echo "nbd.sh: NBD copy differs" >&2; exit 1; }
	rm -f "$work/copy.raw"

	: >"$work/restore.t"; : >"$work/pipe.t"; : >"$work/convert.t"; : >"$work/seqread.t"
	for ((i = 1; i <= runs; i++)); do
		l0=$(load)
		t0=$(now); "${rt[@]}" /usr/bin/time -f '%U %S' -o "$work/r.cpu" "$work/vmvault" "${vvargs[@]}" restore vm01 latest >/dev/null; t1=$(now)
		echo "$t1 - $t0" | bc >>"$work/restore.t"
		line=$(printf 'restore %.2f s (cpu %.2f)' "$(tail -1 "$work/restore.t")" "$(awk '{print $1 + $2}' "$work/r.cpu")")
		t0=$(now); "${rt[@]}" "$work/vmvault" "${vvargs[@]}" restore vm01 latest | "${rt[@]}" cat >/dev/null; t1=$(now)
		echo "$t1 - $t0" | bc >>"$work/pipe.t"
		line+=$(printf '  pipe %.2f s' "$(tail -1 "$work/pipe.t")")
		start_server vm01 latest
		t0=$(now); "${rt[@]}" qemu-img convert -n -f raw --target-image-opts "$url" "driver=null-co,size=$size"; t1=$(now)
		echo "$t1 - $t0" | bc >>"$work/convert.t"
		line+=$(printf '  convert %.2f s (cpu %.2f)' "$(tail -1 "$work/convert.t")" "$(server_cpu)")
		stop_server
		start_server vm01 latest
		t0=$(now); "${rt[@]}" qemu-img bench -f raw -c $((size >> 21)) -s 2M -S 2M -d 8 "$url" >/dev/null; t1=$(now)
		echo "$t1 - $t0" | bc >>"$work/seqread.t"
		line+=$(printf '  seqread %.2f s (cpu %.2f)' "$(tail -1 "$work/seqread.t")" "$(server_cpu)")
		stop_server
		echo "$name round $i (load $l0-$(load)): $line"
	done
	r=$(median <"$work/restore.t"); p=$(median <"$work/pipe.t"); c=$(median <"$work/convert.t"); s=$(median <"$work/seqread.t")
	mbs() { echo "scale=0; $size / $1 / 1000000" | bc; }
	printf '%s median of %d:\n' "$name" "$runs"
	printf '  restore to stdout    %6.2f s  %5s MB/s\n' "$r" "$(mbs "$r")"
	printf '  restore to a pipe    %6.2f s  %5s MB/s\n' "$p" "$(mbs "$p")"
	printf '  NBD qemu-img convert %6.2f s  %5s MB/s  ratio %.2f (pipe %.2f)\n' "$c" "$(mbs "$c")" "$(echo "$r / $c" | bc -l)" "$(echo "$p / $c" | bc -l)"
	printf '  NBD sequential read  %6.2f s  %5s MB/s  ratio %.2f (pipe %.2f)\n' "$s" "$(mbs "$s")" "$(echo "$r / $s" | bc -l)" "$(echo "$p / $s" | bc -l)"
done
((gens > 0)) || exit 0

say "adding $gens generations of vm02"
head -c 8M /dev/urandom >"$work/small.raw"
for ((g = 0; g < gens; g++)); do
	printf 'generation %d' "$g" | dd of="$work/small.raw" conv=notrunc status=none
	vv backup vm02 --source "$work/small.raw" --time "$(date -u -d "2026-01-01 + $g hours" +%Y-%m-%dT%H:%M:%SZ)" >/dev/null
done
: >"$work/first.t"
for ((i = 0; i < runs; i++)); do
	rm -f "$work/s.sock"
	t0=$(now)
	"$work/vmvault" "${vvargs[@]}" serve vm02 latest --listen "unix:$work/s.sock" 2>>"$work/serve.log" &
	server=$!
	until [ -S "$work/s.sock" ] && qemu-io -f raw -r -c 'read 0 512' "$url" >/dev/null 2>&1; do sleep 0.005; done
	t1=$(now)
	echo "$t1 - $t0" | bc >>"$work/first.t"
	stop_server
done
printf 'first byte after serve, %d generations: %.3f s (median of %d)\n' "$((gens + 1))" "$(median <"$work/first.t")" "$runs"
