#!/usr/bin/env bash
# fuse.sh: sequential read through `vmvault mount` against `vmvault restore`
# to stdout, on the same repository (issue 11's target: ratio >= 0.8).
#
# For each IMAGE: backs it up into a fresh local repository, checks once that
# the mounted disk file has the image's SHA-256, then runs --runs rounds, each
# interleaving (so both see the same load):
#   restore   vmvault restore VM latest > /dev/null
#   pipe      vmvault restore VM latest | cat > /dev/null: a second baseline
#             in which restore's output, like a mount's, must reach a reader
#   dd        dd bs=4M of the mounted disk file to /dev/null: every byte,
#             holes included (fresh mount)
#   cat       the same with cat (128 KiB reads)
#   copy      qemu-img convert of the mounted disk file to qemu's null device:
#             skips holes through SEEK_DATA/SEEK_HOLE, as a client copying a
#             disk does (bench/nbd.sh's "convert" through NBD)
#   holes     dd bs=4M, as above, of a disk of the same size that is all
#             holes (another VM in the same repository): moving bytes through
#             the FUSE device and nothing else
# and prints per round the wall seconds, the CPU seconds (user + system; for
# the mount cases the vmvault process's plus the reader's) and the load
# average, then the medians and the ratios restore/case and pipe/case (wall).
# Last, the floor of a dd through the mount on this machine, from restore's
# CPU time R, the holes read (wall H, CPU h) and the image's share of zeros
# z, with n cores: its CPU is at least R + h, so its wall at least
# max((R + h) / n, H) if the zeros are read while data is decoded; where the
# zeros lie together (the end of a disk), a reader that asks for one block
# at a time meanwhile leaves all but one core idle: (R + h(1-z)) / n + H z.
# Restore's wall divided by each is the best ratio a mount could reach.
# Every mount is fresh (cold reader cache); the page cache holds the
# repository for every case. Timings never fail the script; a wrong byte or a
# failed command does. Needs root (direct FUSE mount) and GNU time.
#
# --rt runs every timed command at real-time round-robin priority (chrt -r 10)
# so that other load on a shared machine disturbs the comparison less; the
# kernel still leaves 5 % of each second to other tasks.
#
# Usage: bench/fuse.sh IMAGE... [--runs N] [--rt] [--vmvault BIN] [--workdir DIR]
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=3
images=()
vmvault_bin=
workdir=
rt=()
while (($#)); do
	case $1 in
	--runs) runs=$2; shift 2 ;;
	--rt) rt=(chrt -r 10); shift ;;
	--vmvault) vmvault_bin=$2; shift 2 ;;
	--workdir) workdir=$2; shift 2 ;;
	-*) echo "fuse.sh: unknown option $1" >&2; exit 2 ;;
	*) images+=("$1"); shift ;;
	esac
done
((${#images[@]})) || { echo "usage: bench/fuse.sh IMAGE... [--runs N] [--rt] [--vmvault BIN] [--workdir DIR]" >&2; exit 2; }
command -v qemu-img >/dev/null || { echo "fuse.sh: qemu-img not found (scripts/deps.sh installs qemu-utils)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "fuse.sh: needs root (direct FUSE mount)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "fuse.sh: needs GNU time (/usr/bin/time)" >&2; exit 1; }
[ -n "$workdir" ] || workdir=$(mktemp -d /var/tmp/vmvault-fuse-bench.XXXXXX)
mkdir -p "$workdir"
mnt=$workdir/mnt
mkdir -p "$mnt"
server=
cleanup() {
	if [ -n "$server" ]; then
		kill "$server" 2>/dev/null || true
		wait "$server" 2>/dev/null || true
	fi
	mountpoint -q "$mnt" 2>/dev/null && umount "$mnt" || true
	rm -rf "$workdir"
}
trap cleanup EXIT
say() { echo "fuse.sh: $*" >&2; }

bin=$workdir/vmvault
if [ -n "$vmvault_bin" ]; then cp "$vmvault_bin" "$bin"; else (cd "$root" && go build -o "$bin" ./cmd/vmvault); fi
printf 'bench password\n' >"$workdir/pw"
chmod 600 "$workdir/pw"

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
load() { cut -d' ' -f1 /proc/loadavg; }

# start_mount mounts the repository on $mnt and waits until it answers.
start_mount() {
	# Emptied here, not only by the child's redirection: the loop below
	# might otherwise still see the last mount's "mounted".
	: >"$workdir/mount.log"
	"${rt[@]}" "$bin" "${margs[@]}" mount "$mnt" 2>>"$workdir/mount.log" &
	server=$!
	until grep -q mounted "$workdir/mount.log" 2>/dev/null; do
		kill -0 "$server" 2>/dev/null || { cat "$workdir/mount.log" >&2; exit 1; }
		sleep 0.02
	done
}
stop_mount() {
	kill "$server"
	wait "$server" || { cat "$workdir/mount.log" >&2; exit 1; }
	server=
}

# mount_read READER: mounts, reads the disk file with READER (dd, cat or
# copy), unmounts; prints "wall cpu".
mount_read() {
	start_mount
	local t0 t1 ticks
	t0=$(now)
	local timed=("${rt[@]}" /usr/bin/time -f '%U %S' -o "$workdir/reader.t")
	case $1 in
	dd) "${timed[@]}" dd if="$disk" of=/dev/null bs=4M status=none ;;
	cat) "${timed[@]}" cat "$disk" >/dev/null ;;
	copy) "${timed[@]}" qemu-img convert -n -f raw --target-image-opts "$disk" "driver=null-co,size=$(stat -c %s "$disk")" ;;
	esac
	t1=$(now)
	# utime and stime of the vmvault process, in clock ticks.
	ticks=$(awk '{print $14 + $15}' "/proc/$server/stat")
	stop_mount
	echo "$(echo "$t1 - $t0" | bc) $(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" '{print t / hz + $1 + $2}' "$workdir/reader.t")"
}

for image in "${images[@]}"; do
	name=$(basename "$(dirname "$image")")/$(basename "$image")
	repo=$workdir/repo
	rm -rf "$repo" "$workdir/cache"
	# mount logs "mounted" once it answers: not with -q.
	margs=(--repo "$repo" --password-file "$workdir/pw" --cache-dir "$workdir/cache")
	vvargs=("${margs[@]}" -q)
	"$bin" "${vvargs[@]}" init --kdf-params t=1,m=8192,p=1 >/dev/null 2>&1
	say "$name: backing up"
	"$bin" "${vvargs[@]}" backup vm01 --source "disk=$image" --json >"$workdir/backup.json"
	zero=$(grep -o '"bytes_zero":[0-9]*' "$workdir/backup.json" | cut -d: -f2)
	size=$(stat -c %s "$image")
	truncate -s "$size" "$workdir/holes.raw"
	"$bin" "${vvargs[@]}" backup vm02 --source "disk=$workdir/holes.raw" >/dev/null
	rm -f "$workdir/holes.raw"
	disk=$mnt/vm01/latest/disk
	want=$(sha256sum <"$image" | cut -d' ' -f1)
	start_mount
	got=$(sha256sum <"$disk" | cut -d' ' -f1)
	stop_mount
	[ "$got" = "$want" ] || { echo "fuse.sh: $name: mounted disk file differs from the image" >&2; exit 1; }

	cases=(restore dd cat copy)
	for c in "${cases[@]}" pipe holes; do : >"$workdir/$c.w"; : >"$workdir/$c.c"; done
	for ((i = 1; i <= runs; i++)); do
		l0=$(load)
		t0=$(now)
		"${rt[@]}" /usr/bin/time -f '%U %S' -o "$workdir/restore.t" "$bin" "${vvargs[@]}" restore vm01 latest >/dev/null
		t1=$(now)
		echo "$t1 - $t0" | bc >>"$workdir/restore.w"
		awk '{print $1 + $2}' "$workdir/restore.t" >>"$workdir/restore.c"
		line=$(printf 'restore %.2f s (cpu %.2f)' "$(tail -1 "$workdir/restore.w")" "$(tail -1 "$workdir/restore.c")")
		t0=$(now)
		"${rt[@]}" "$bin" "${vvargs[@]}" restore vm01 latest | "${rt[@]}" cat >/dev/null
		t1=$(now)
		echo "$t1 - $t0" | bc >>"$workdir/pipe.w"
		line+=$(printf '  pipe %.2f s' "$(tail -1 "$workdir/pipe.w")")
		for c in "${cases[@]:1}"; do
			mount_read "$c" >"$workdir/m.out"
			read -r w cpu <"$workdir/m.out"
			echo "$w" >>"$workdir/$c.w"
			echo "$cpu" >>"$workdir/$c.c"
			line+=$(printf '  %s %.2f s (cpu %.2f)' "$c" "$w" "$cpu")
		done
		disk=$mnt/vm02/latest/disk
		mount_read dd >"$workdir/m.out"
		disk=$mnt/vm01/latest/disk
		read -r w cpu <"$workdir/m.out"
		echo "$w" >>"$workdir/holes.w"
		echo "$cpu" >>"$workdir/holes.c"
		line+=$(printf '  holes %.2f s (cpu %.2f)' "$w" "$cpu")
		echo "$name round $i (load $l0-$(load)): $line"
	done
	r=$(median <"$workdir/restore.w")
	p=$(median <"$workdir/pipe.w")
	line=$(printf 'restore %.2f s (cpu %.2f), pipe %.2f s' "$r" "$(median <"$workdir/restore.c")" "$p")
	for c in "${cases[@]:1}"; do
		w=$(median <"$workdir/$c.w")
		line+=$(printf ', %s %.2f s (cpu %.2f) ratio %.2f (pipe %.2f)' "$c" "$w" "$(median <"$workdir/$c.c")" "$(echo "$r / $w" | bc -l)" "$(echo "$p / $w" | bc -l)")
	done
	echo "$name median of $runs: $line"
	rc=$(median <"$workdir/restore.c")
	hw=$(median <"$workdir/holes.w")
	hc=$(median <"$workdir/holes.c")
	awk -v n="$(nproc)" -v R="$rc" -v r="$r" -v H="$hw" -v h="$hc" -v z="$zero" -v s="$size" -v name="$name" 'BEGIN {
		z /= s
		over = (R + h) / n; if (H > over) over = H
		serial = (R + h * (1 - z)) / n + H * z
		printf "%s floor on %d cores (zeros %.0f %%, holes read %.2f s, cpu %.2f): %.2f s if the zeros overlap decoding, ratio at most %.2f; %.2f s if they lie together, ratio at most %.2f\n", name, n, 100 * z, H, h, over, r / over, serial, r / serial
	}'
done
