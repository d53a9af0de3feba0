#!/usr/bin/env bash
# restore.sh: every way out of a repository, timed on one image, against restic.
#
# Backs IMAGE up once into a fresh vmvault repository (and a restic one),
# writes both out to disk (sync) and reads each once, untimed, so every
# case finds the repository in the page cache, then times --runs rounds of
# every case, interleaved (round 1 of each case, then round 2, ...: a busy
# spell of the shared host hits all cases alike), and reports the median
# round of each case (as bench/compare.sh does) and its fastest:
#   vmvault restore to stdout (/dev/null)          "stdout"
#   vmvault restore to stdout into a new file      "stdout-file" (what
#     `restore vm latest > disk.raw` does; same file system as target-new)
#   vmvault restore --target into a new file       "target-new"
#   vmvault restore --target onto a block device   "blockdev": a loop device
#     over a file on /dev/shm, discarded (all zeros) before each run; as
#     root with losetup only
#   vmvault restore to stdout into that device      "blockdev-stdout" (its
#     "/stdout-file" column compares blockdev with it: the same target)
#   vmvault restore --target over the same image   "target-same" (compare only)
#   vmvault dump of the whole disk (/dev/null)     "dump"
#   sequential read through vmvault mount (cat)    "fuse"
#   restic dump (/dev/null) and restore --sparse   "restic-dump", "restic-sparse"
#     (restic writes the file through the page cache and syncs nothing;
#     vmvault's --target fsyncs before it exits 0)
#   restic restore --sparse, then the file fsynced "restic-sparse-sync"
#     (sync FILE: what restic's restore costs made as durable as --target)
#   with --sftp, the vmvault restores again over a private sshd on 127.0.0.1
# and checks each vmvault output once by SHA-256. Prints every run with the
# load average, then per case the median's wall, user and system seconds,
# the SFTP server's CPU seconds (sshd and its sftp sessions), peak RSS,
# the fastest wall, and the ratios of the medians against stdout,
# stdout-file (for the cases that write a file or device) and restic;
# with --sftp also the floor of a remote restore on this machine (the
# local restore's CPU plus the sshd's, on every core, over the local wall).
# Timings never fail the script; a differing restore does.
#
# Usage: bench/restore.sh IMAGE [--runs N] [--restic BIN] [--vmvault BIN] [--sftp] [--workdir DIR]
#   --vmvault BIN  use this vmvault binary instead of building ./cmd/vmvault
#   --restic BIN   restic binary (default: restic on PATH; 0.19.1 is the reference:
#                  GOBIN=/tmp/r go install github.com/restic/restic/cmd/restic@v0.19.1)
# Page caches stay warm (the machine is shared): every case reads the
# repository from memory, so the figures compare CPU and system-call cost.
# Needs root for the FUSE case (direct mount) and GNU time.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${1:?usage: bench/restore.sh IMAGE [--runs N] [--restic BIN] [--sftp] [--workdir DIR]}
shift
runs=2
restic_bin=$(command -v restic || true)
sftp=
workdir=
vmvault_bin=
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) runs=$2; shift 2 ;;
	--restic) restic_bin=$2; shift 2 ;;
	--sftp) sftp=1; shift ;;
	--vmvault) vmvault_bin=$2; shift 2 ;;
	--workdir) workdir=$2; shift 2 ;;
	*) echo "restore.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
[ -n "$workdir" ] || workdir=$(mktemp -d /var/tmp/vmvault-restore-bench.XXXXXX)
mkdir -p "$workdir"
mnt="$workdir/mnt"
cleanup() {
	mountpoint -q "$mnt" 2>/dev/null && umount "$mnt" || true
	[ -n "${sshd_pid:-}" ] && kill "$sshd_pid" 2>/dev/null || true
	[ -n "${loopdev:-}" ] && losetup -d "$loopdev" 2>/dev/null || true
	[ -n "${loopfile:-}" ] && rm -f "$loopfile"
	rm -rf "$workdir"
}
trap cleanup EXIT

bin="$workdir/vmvault"
if [ -n "$vmvault_bin" ]; then cp "$vmvault_bin" "$bin"; else (cd "$repo_root" && go build -o "$bin" ./cmd/vmvault); fi
echo "benchpass" > "$workdir/pw"
chmod 600 "$workdir/pw"
export VMVAULT_PASSWORD_FILE="$workdir/pw" RESTIC_PASSWORD=benchpass
vm() { "$bin" --cache-dir "$workdir/cache" "$@"; }
want=$(sha256sum < "$image" | cut -d' ' -f1)
size=$(stat -c %s "$image")

vm --repo "$workdir/repo" init >/dev/null 2>&1
vm --repo "$workdir/repo" backup bench --source "disk=$image" >/dev/null 2>&1
if [ -n "$restic_bin" ]; then
	"$restic_bin" -r "$workdir/restic" init >/dev/null
	(cd "$(dirname "$image")" && "$restic_bin" -r "$workdir/restic" backup "$(basename "$image")" >/dev/null)
fi

# Everything the cases need is set up before the first timed run.
vm --repo "$workdir/repo" restore bench latest >/dev/null 2>&1
[ -z "$restic_bin" ] || "$restic_bin" -r "$workdir/restic" dump latest "/$(basename "$image")" >/dev/null
sync -f "$workdir"

R="--repo $workdir/repo"
V="'$bin' --cache-dir '$workdir/cache'"
names=() cmds=()
# add NAME CMD: a case, CMD a shell string.
add() { names+=("$1"); cmds+=("$2"); }
add stdout "$V $R restore bench latest > /dev/null 2>/dev/null"
add stdout-file "rm -f '$workdir/out.raw'; $V $R restore bench latest > '$workdir/out.raw' 2>/dev/null"
add target-new "rm -f '$workdir/t.raw'; $V $R restore bench latest --target '$workdir/t.raw' 2>/dev/null"
add target-same "$V $R restore bench latest --target '$workdir/t.raw' 2>/dev/null"
if [ "$(id -u)" -eq 0 ] && command -v losetup >/dev/null && command -v blkdiscard >/dev/null; then
	loopfile=$(mktemp /dev/shm/vmvault-restore-bench.XXXXXX)
	truncate -s "$size" "$loopfile"
	loopdev=$(losetup -f --show "$loopfile")
	# blkdiscard empties the device (and its page cache): every run
	# restores onto zeros, as onto a new thin LV.
	add blockdev "blkdiscard -f '$loopdev' 2>/dev/null && $V $R restore bench latest --target '$loopdev' 2>/dev/null"
	add blockdev-stdout "blkdiscard -f '$loopdev' 2>/dev/null && $V $R restore bench latest > '$loopdev' 2>/dev/null"
fi
add dump "$V $R dump bench latest > /dev/null 2>/dev/null"
# Each FUSE run mounts afresh (the kernel keeps a disk file's pages cached
# across opens) and unmounts; the time includes mounting.
mkdir -p "$mnt"
cat > "$workdir/fuse-read.sh" <<FUSE
set -e
'$bin' --cache-dir '$workdir/cache' $R mount '$mnt' 2>>'$workdir/mount.log' &
pid=\$!
for _ in \$(seq 500); do [ -e '$mnt/bench/latest/disk' ] && break; sleep 0.02; done
cat '$mnt/bench/latest/disk' > \${FUSE_OUT:-/dev/null}
kill \$pid
wait \$pid
FUSE
add fuse "bash '$workdir/fuse-read.sh'"
if [ -n "$restic_bin" ]; then
	add restic-dump "'$restic_bin' -r '$workdir/restic' dump latest '/$(basename "$image")' > /dev/null"
	add restic-sparse "rm -rf '$workdir/rr'; '$restic_bin' -r '$workdir/restic' restore latest --sparse --target '$workdir/rr' > /dev/null"
	add restic-sparse-sync "rm -rf '$workdir/rr'; '$restic_bin' -r '$workdir/restic' restore latest --sparse --target '$workdir/rr' > /dev/null && sync '$workdir/rr/$(basename "$image")'"
fi
if [ -n "$sftp" ]; then
	sd="$workdir/sshd"
	mkdir -p "$sd" /run/sshd
	chmod 711 "$sd"
	ssh-keygen -q -t ed25519 -N '' -f "$sd/host"
	ssh-keygen -q -t ed25519 -N '' -f "$sd/client"
	cp "$sd/client.pub" "$sd/authorized_keys"
	port=$((20000 + RANDOM % 20000))
	cat > "$sd/config" <<-SSHD
		ListenAddress 127.0.0.1
		Port $port
		HostKey $sd/host
		PidFile $sd/pid
		AuthorizedKeysFile $sd/authorized_keys
		PasswordAuthentication no
		KbdInteractiveAuthentication no
		UsePAM no
		StrictModes no
		Subsystem sftp internal-sftp
	SSHD
	/usr/sbin/sshd -D -e -f "$sd/config" >"$sd/log" 2>&1 &
	sshd_pid=$!
	sleep 0.5
	echo "[127.0.0.1]:$port $(cat "$sd/host.pub")" > "$sd/known_hosts"
	S="--repo sftp://root@127.0.0.1:$port$workdir/repo --ssh-key $sd/client --known-hosts $sd/known_hosts"
	add sftp-stdout "$V $S restore bench latest > /dev/null 2>/dev/null"
	add sftp-target-new "rm -f '$workdir/st.raw'; $V $S restore bench latest --target '$workdir/st.raw' 2>/dev/null"
fi

# server_cpu: CPU seconds of the private sshd and its finished sessions
# (0 without --sftp): the SFTP server's share of a remote restore.
server_cpu() {
	if [ -n "${sshd_pid:-}" ]; then
		awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15 + $16 + $17) / hz }' "/proc/$sshd_pid/stat"
	else
		echo 0
	fi
}
mkdir -p "$workdir/runs"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((round = 1; round <= runs; round++)); do
	for i in "${!names[@]}"; do
		name=${names[$i]}
		s0=$(server_cpu)
		/usr/bin/time -f "%e %U %S %M" -o "$workdir/time" bash -c "${cmds[$i]}" || { echo "restore.sh: $name failed" >&2; exit 1; }
		[ -z "${sshd_pid:-}" ] || sleep 0.2 # the sessions' sshd processes exit and are counted
		s1=$(server_cpu)
		read -r w u s m < "$workdir/time"
		load=$(cut -d' ' -f1 /proc/loadavg)
		echo "$w $u $s $((m / 1024)) $(awk "BEGIN{ printf \"%.2f\", $s1 - $s0 }") $load" >> "$workdir/runs/$name"
		printf "run %d %-18s wall %6s s  user %6s  sys %6s  load %s\n" "$round" "$name" "$w" "$u" "$s" "$load"
	done
done

check() { # check NAME FILE
	local got
	got=$(sha256sum < "$2" | cut -d' ' -f1)
	[ "$got" = "$want" ] || { echo "restore.sh: $1 restored a different image" >&2; exit 1; }
}
check stdout-file "$workdir/out.raw"
check target-new "$workdir/t.raw"
rm -f "$workdir/out.raw" "$workdir/t.raw"
if [ -n "${loopdev:-}" ]; then
	check blockdev "$loopdev"
	losetup -d "$loopdev"
	rm -f "$loopfile"
	loopdev= loopfile=
fi
FUSE_OUT="$workdir/fuse.out" bash "$workdir/fuse-read.sh"
check fuse "$workdir/fuse.out"
rm -rf "$workdir/fuse.out" "$workdir/rr"
if [ -n "$sftp" ]; then
	check sftp-target-new "$workdir/st.raw"
	rm -f "$workdir/st.raw"
fi

# The median run of each case (by wall time; the lower middle of an even
# count) gives every column; best is the fastest wall.
declare -A wall user sys rss server best
for name in "${names[@]}"; do
	read -r w u s m sv _ < <(sort -n "$workdir/runs/$name" | sed -n "$(((runs + 1) / 2))p")
	wall[$name]=$w user[$name]=$u sys[$name]=$s rss[$name]=$m server[$name]=$sv
	best[$name]=$(sort -n "$workdir/runs/$name" | head -1 | cut -d' ' -f1)
done

ratio() { awk "BEGIN{ if ($2 > 0) printf \"%.2f\", $1 / $2; else print \"-\" }"; }
cpu() { awk "BEGIN{ printf \"%.2f\", ${user[$1]} + ${sys[$1]} + ${server[$1]} }"; }
printf "image %s, %d MiB; median of %d interleaved rounds; %s\n" "$image" $((size >> 20)) "$runs" "$("$restic_bin" version 2>/dev/null | cut -d' ' -f1-2)"
echo "ratios: wall of the medians (cpu = user+sys, plus the sshd's for sftp); on a busy machine the cpu ratios are the steadier"
echo "restic-sparse writes through the page cache and syncs nothing; target-new, stdout-file and blockdev fsync before exit 0"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
printf "%-18s %8s %8s %8s %8s %8s %8s %14s %14s %14s %14s\n" case wall_s best_s user_s sys_s sshd_s rss_MiB "/stdout" "/stdout-file" "/restic" "/local-same"
for name in stdout stdout-file target-new target-same blockdev blockdev-stdout dump fuse restic-dump restic-sparse restic-sparse-sync sftp-stdout sftp-target-new; do
	[ -n "${wall[$name]:-}" ] || continue
	ref=
	case $name in
	stdout | dump | fuse) [ -n "${wall[restic-dump]:-}" ] && ref=restic-dump ;;
	target-new | stdout-file) [ -n "${wall[restic-sparse]:-}" ] && ref=restic-sparse ;;
	esac
	file=
	case $name in
	target-new | target-same) [ -n "${wall[stdout-file]:-}" ] && file=stdout-file ;;
	blockdev) [ -n "${wall[blockdev-stdout]:-}" ] && file=blockdev-stdout ;;
	esac
	same=
	case $name in
	sftp-stdout) same=stdout ;;
	sftp-target-new) same=target-new ;;
	esac
	both() { echo "$(ratio "${wall[$1]}" "${wall[$2]}") ($(ratio "$(cpu "$1")" "$(cpu "$2")"))"; }
	printf "%-18s %8s %8s %8s %8s %8s %8s %14s %14s %14s %14s\n" "$name" "${wall[$name]}" "${best[$name]}" "${user[$name]}" "${sys[$name]}" "${server[$name]}" "${rss[$name]}" \
		"$(both "$name" stdout)" "${file:+$(both "$name" "$file")}" "${ref:+$(both "$name" "$ref")}" "${same:+$(both "$name" "$same")}"
done
# The floor of a remote restore on this machine: vmvault's local work and
# the SFTP server's measured work, every core busy all the time, ÷ the
# local wall. A target below it cannot be met here whatever the client does.
for name in sftp-stdout sftp-target-new; do
	[ -n "${wall[$name]:-}" ] || continue
	case $name in sftp-stdout) same=stdout ;; *) same=target-new ;; esac
	awk -v lw="${wall[$same]}" -v lc="$(cpu "$same")" -v sv="${server[$name]}" -v n="$(nproc)" -v w="${wall[$name]}" -v c="$name" \
		'BEGIN { f = (lc + sv) / n; if (f < lw) f = lw; printf "%s / local: %.2f, floor %.2f (local cpu %.2f s + sshd %.2f s on %d cores)\n", c, w / lw, f / lw, lc, sv, n }'
done
if [ -n "${wall[restic-sparse-sync]:-}" ] && [ -n "${wall[target-new]:-}" ]; then
	echo "target-new / restic-sparse-sync (both made durable): $(ratio "${wall[target-new]}" "${wall[restic-sparse-sync]}")"
fi
