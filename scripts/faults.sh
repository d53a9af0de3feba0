#!/usr/bin/env bash
# Fault campaign (issue 9): kills and starves vmvault at random points and
# checks after every fault that the repository is sound and that every
# generation restores byte-identical to the image it was made from.
#
#   scripts/faults.sh [BACKUP_KILLS [PRUNE_KILLS]]     (default 50 30)
#
# Faults: SIGKILL of a backup at BACKUP_KILLS random points; SIGKILL of a
# prune at PRUNE_KILLS random points; the SFTP server (a real sshd on
# 127.0.0.1) killed mid-upload; the repository's filesystem (a small tmpfs)
# filled during a backup; a prune run from the host while a backup runs in
# another PID namespace (unshare -p). After each: `check --read-data`, and a
# restore of every generation compared with the image it was made from.
#
# Prints: runs, generations restored byte-identical, wrong bytes (restored
# but different; must be 0), committed generations lost (missing, or no
# longer restorable; must be 0), failed checks (must be 0).
# Exits non-zero if any of the last three is not 0. Needs root (tmpfs,
# unshare) and openssh-server; not part of CI (it takes several minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
BACKUP_KILLS=${1:-50}
PRUNE_KILLS=${2:-30}

work=$(mktemp -d /tmp/vmvault-faults.XXXXXX)
sshd_pid=""
cleanup() {
	[ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null
	mountpoint -q "$work/small" 2>/dev/null && umount "$work/small"
	rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/vmvault" ./cmd/vmvault || exit 1
echo "correct horse battery" >"$work/pw"
chmod 600 "$work/pw"
mkdir -p "$work/images"

REPO=$work/repo
EXTRA=()
V() { "$work/vmvault" --repo "$REPO" --password-file "$work/pw" --cache-dir "$work/cache" "${EXTRA[@]}" "$@"; }
# VB runs vmvault in the background with its own PID in $! (a function
# run with & is a subshell: killing $! would leave vmvault running).
VB() {
	"$work/vmvault" --repo "$REPO" --password-file "$work/pw" --cache-dir "$work/cache" "${EXTRA[@]}" "$@" &
}

runs=0 restored=0 wrong_bytes=0 lost=0 check_failed=0
killed=0 finished_first=0 prune_killed=0 sftp_cut=0
declare -A committed # generation ID -> tag, for backups that reported success
declare -A forgotten # generation IDs removed on purpose
declare -A broken    # generation IDs that failed to restore (counted lost once)

log() { printf '%s\n' "$*" >&2; }

# Image for run tag $1: the previous image with a few random 64 KiB blocks
# rewritten (a VM's day), kept until its generations are gone.
prev=""
new_image() {
	local img=$work/images/$1
	if [ -z "$prev" ]; then
		head -c 6M /dev/urandom >"$img"
		head -c 2M /dev/zero >>"$img"
		head -c 4M /dev/urandom >>"$img"
	else
		cp "$prev" "$img"
		for _ in 1 2 3; do
			dd if=/dev/urandom of="$img" bs=64K count=1 seek=$((RANDOM % 192)) conv=notrunc status=none
		done
	fi
	prev=$img
}

# generations prints "ID TAG" per generation of vm01.
generations() {
	V snapshots vm01 --json 2>/dev/null | grep -o '"id":"[0-9a-f]*"\|"tags":\["[^"]*"' |
		sed -e 's/"id":"\(.*\)"/\1/' -e 's/"tags":\["\(.*\)"/\1/' | paste - -
}

# verify checks the repository and restores every generation.
verify() {
	local what=$1 id tag out n
	if ! V check --read-data >/dev/null 2>"$work/check.err"; then
		check_failed=$((check_failed + 1))
		log "FAIL check after $what: $(tail -1 "$work/check.err")"
	fi
	local -A present=()
	while read -r id tag; do
		[ -n "$id" ] || continue
		present[$id]=1
		out=$work/restored
		if ! V restore vm01 "${id:0:12}" >"$out" 2>"$work/restore.err"; then
			log "FAIL restore $tag ${id:0:8} after $what: $(tail -1 "$work/restore.err")"
			# A generation that no longer restores is lost (once).
			if [ -z "${broken[$id]:-}" ]; then
				broken[$id]=1
				lost=$((lost + 1))
			fi
			continue
		fi
		if cmp -s "$out" "$work/images/$tag"; then
			restored=$((restored + 1))
		else
			n=$(cmp -l "$out" "$work/images/$tag" 2>/dev/null | wc -l)
			[ "$n" -gt 0 ] || n=1
			wrong_bytes=$((wrong_bytes + n))
			log "FAIL generation $tag ${id:0:8} restores $n wrong bytes after $what"
		fi
	done < <(generations)
	for id in "${!committed[@]}"; do
		if [ -z "${present[$id]:-}" ] && [ -z "${forgotten[$id]:-}" ] && [ -z "${broken[$id]:-}" ]; then
			lost=$((lost + 1))
			broken[$id]=1 # count once
			log "FAIL committed generation ${committed[$id]} ${id:0:8} lost after $what"
		fi
	done
	# Drop images no generation needs any more (keep the newest); only
	# in the main repository, which the last section returns to.
	[ "$REPO" = "$work/repo" ] || return 0
	local -A need=()
	while read -r id tag; do need[$tag]=1; done < <(generations)
	for f in "$work"/images/*; do
		[ "$f" = "$prev" ] || [ -n "${need[$(basename "$f")]:-}" ] || rm -f "$f"
	done
}

# backup_run TAG [kill-after-seconds]: one backup, optionally SIGKILLed.
backup_run() {
	local tag=$1 after=${2:-} pid id t0 took
	new_image "$tag"
	t0=$(date +%s%N)
	VB backup vm01 --source "$work/images/$tag" --tag "$tag" --json >"$work/backup.out" 2>"$work/backup.err"
	pid=$!
	if [ -n "$after" ]; then
		sleep "$after"
		kill -9 "$pid" 2>/dev/null
	fi
	wait "$pid" 2>/dev/null
	case $? in
	0)
		id=$(grep -o '"id":"[0-9a-f]*"' "$work/backup.out" | head -1 | cut -d'"' -f4)
		[ -n "$id" ] && committed[$id]=$tag
		[ -n "$after" ] && finished_first=$((finished_first + 1))
		# Kill points are spread over how long a backup takes.
		took=$((($(date +%s%N) - t0) / 1000000))
		[ "$took" -gt 20 ] && [ "$took" -lt 1000 ] && bdur=$took
		;;
	137) killed=$((killed + 1)) ;;
	*) log "note: backup $tag failed: $(tail -1 "$work/backup.err")" ;;
	esac
	runs=$((runs + 1))
}

# forget_to N: keep the N newest generations (on purpose, not a fault).
forget_to() {
	local before after id
	before=$(generations | cut -f1)
	V forget vm01 --keep-last "$1" >/dev/null 2>&1
	after=$(generations | cut -f1)
	for id in $before; do
		grep -q "$id" <<<"$after" || forgotten[$id]=1
	done
}

# rand_delay MAX: a random delay in [0, MAX) seconds, MAX in milliseconds.
rand_delay() { printf '0.%03d' $((RANDOM % $1)); }

V init --kdf-params t=1,m=8192,p=1 --segment-size 1048576 >/dev/null 2>&1 || { log "init failed"; exit 1; }

# --- SIGKILL a backup at random points ---------------------------------
# Until BACKUP_KILLS backups were really killed (some finish first), at
# most three times as many attempts.
bdur=300 # ms: the duration of the last backup that finished
backup_run base
verify "first backup"
log "backup kills: $BACKUP_KILLS"
i=0
while [ "$killed" -lt "$BACKUP_KILLS" ] && [ "$i" -lt $((3 * BACKUP_KILLS)) ]; do
	i=$((i + 1))
	backup_run "kb$i" "$(rand_delay "$bdur")"
	V unlock >/dev/null 2>&1
	verify "backup killed ($i)"
	[ $((i % 8)) -eq 0 ] && forget_to 4
done

# --- SIGKILL a prune at random points ----------------------------------
log "prune kills: $PRUNE_KILLS"
pdur=300 # ms
i=0
while [ "$prune_killed" -lt "$PRUNE_KILLS" ] && [ "$i" -lt $((3 * PRUNE_KILLS)) ]; do
	i=$((i + 1))
	backup_run "kp$i" "$(rand_delay "$bdur")" # leaves garbage for prune
	V unlock >/dev/null 2>&1
	backup_run "p$i"
	forget_to 3
	# No margin: nothing else runs, so prune deletes what the forget and
	# the killed backup left. The kill point is spread over how long the
	# last prune that finished took.
	t0=$(date +%s%N)
	VB prune --safety-margin 0 >/dev/null 2>&1
	pid=$!
	sleep "$(rand_delay "$pdur")"
	kill -9 "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
	if [ $? -eq 137 ]; then
		prune_killed=$((prune_killed + 1))
	else
		took=$((($(date +%s%N) - t0) / 1000000))
		[ "$took" -gt 20 ] && [ "$took" -lt 1000 ] && pdur=$took
	fi
	runs=$((runs + 1))
	V unlock >/dev/null 2>&1
	verify "prune killed ($i)"
done
V prune --safety-margin 0 >/dev/null 2>&1 || log "FAIL prune after the prune kills"

# --- the SFTP server killed mid-upload ---------------------------------
if [ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null; then
	s=$work/sshd
	mkdir -p "$s" /run/sshd
	chmod 711 "$s"
	ssh-keygen -q -t ed25519 -N '' -f "$s/host" && ssh-keygen -q -t ed25519 -N '' -f "$s/client"
	cp "$s/client.pub" "$s/authorized_keys"
	port=$((20000 + RANDOM % 20000))
	cat >"$s/config" <<-EOF
		ListenAddress 127.0.0.1
		Port $port
		HostKey $s/host
		PidFile $s/pid
		AuthorizedKeysFile $s/authorized_keys
		PasswordAuthentication no
		KbdInteractiveAuthentication no
		UsePAM no
		StrictModes no
		Subsystem sftp internal-sftp
	EOF
	echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$s/host.pub")" >"$s/known_hosts"
	start_sshd() {
		/usr/sbin/sshd -D -e -f "$s/config" >"$s/log" 2>&1 &
		sshd_pid=$!
		for _ in $(seq 50); do
			(exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && return
			sleep 0.1
		done
	}
	start_sshd
	REPO=sftp://root@127.0.0.1:$port$work/srepo
	EXTRA=(--ssh-key "$s/client" --known-hosts "$s/known_hosts")
	committed=() forgotten=() prev=""
	V init --kdf-params t=1,m=8192,p=1 --segment-size 1048576 >/dev/null 2>&1 || log "FAIL sftp init"
	backup_run sbase
	verify "first SFTP backup"
	for i in 1 2 3 4 5; do
		prev="" # a new image: a dozen objects to upload
		new_image "s$i"
		before=$(find "$work/srepo/data" -type f | wc -l)
		VB backup vm01 --source "$work/images/s$i" --tag "s$i" >/dev/null 2>&1
		pid=$!
		# Mid-upload: once the first new objects have arrived.
		for _ in $(seq 200); do
			[ "$(find "$work/srepo/data" -type f | wc -l)" -gt "$before" ] && break
			sleep 0.02
		done
		sleep "$(rand_delay 100)"
		# The listener and the session processes it forked (by PID).
		pkill -9 -P "$sshd_pid" 2>/dev/null
		kill -9 "$sshd_pid" 2>/dev/null
		wait "$sshd_pid" 2>/dev/null
		if wait "$pid" 2>/dev/null; then
			log "note: SFTP backup s$i finished before the server died"
		else
			sftp_cut=$((sftp_cut + 1))
		fi
		runs=$((runs + 1))
		start_sshd
		V unlock >/dev/null 2>&1
		verify "SFTP server killed ($i)"
	done
	kill "$sshd_pid" 2>/dev/null
	wait "$sshd_pid" 2>/dev/null
	sshd_pid=""
	EXTRA=()
else
	log "SKIPPED: SFTP server kill (no /usr/sbin/sshd)"
fi

# --- the repository's filesystem full during a backup ------------------
mkdir -p "$work/small"
if mount -t tmpfs -o size=20m tmpfs "$work/small" 2>/dev/null; then
	REPO=$work/small/repo
	committed=() forgotten=() prev=""
	V init --kdf-params t=1,m=8192,p=1 --segment-size 1048576 >/dev/null 2>&1
	backup_run fbase # ~10 MiB stored
	for i in 1 2; do
		# An unrelated image: its data does not fit.
		head -c 16M /dev/urandom >"$work/images/full$i"
		if V backup vm01 --source "$work/images/full$i" --tag "full$i" >/dev/null 2>"$work/full.err"; then
			log "FAIL backup into a full filesystem reported success"
			check_failed=$((check_failed + 1))
		fi
		runs=$((runs + 1))
		V unlock >/dev/null 2>&1
		verify "filesystem full ($i)"
	done
	umount "$work/small"
else
	log "SKIPPED: full filesystem (cannot mount a tmpfs)"
fi

# --- prune from the host while a backup runs in another PID namespace --
if unshare -p -f --mount-proc true 2>/dev/null; then
	REPO=$work/repo
	committed=() forgotten=()
	while read -r id tag; do committed[$id]=$tag; done < <(generations)
	prev=$(ls -t "$work"/images/* | head -1)
	for i in 1 2 3; do
		new_image "ns$i"
		img=$work/images/ns$i
		# The backup reads a pipe that stalls half way, so it is surely
		# running (and its uploads unreferenced) while prune runs. Inside
		# the namespace its PID is set high (ns_last_pid), so that no host
		# process has it: its lock names a PID the host cannot see.
		{
			head -c 6M "$img"
			sleep 2
			tail -c +$((6 * 1024 * 1024 + 1)) "$img"
		} | unshare -p -f --mount-proc sh -c 'echo $((30000 + $$ % 2000)) >/proc/sys/kernel/ns_last_pid; "$@"; exit $?' sh \
			"$work/vmvault" --repo "$REPO" --password-file "$work/pw" --cache-dir "$work/cache" \
			backup vm01 --source - --tag "ns$i" --json >"$work/backup.out" 2>"$work/backup.err" &
		pid=$!
		sleep 1
		V prune >/dev/null 2>&1
		if wait "$pid" 2>/dev/null; then
			id=$(grep -o '"id":"[0-9a-f]*"' "$work/backup.out" | head -1 | cut -d'"' -f4)
			[ -n "$id" ] && committed[$id]="ns$i"
		fi
		runs=$((runs + 1))
		verify "prune during a backup in another PID namespace ($i)"
	done
else
	log "SKIPPED: PID namespace (unshare -p not permitted)"
fi

echo "runs: $runs (backups SIGKILLed: $killed, finished before their kill: $finished_first; prunes SIGKILLed: $prune_killed; SFTP backups cut off: $sftp_cut)"
echo "generations restored byte-identical: $restored"
echo "wrong bytes: $wrong_bytes"
echo "committed generations lost: $lost"
echo "failed checks: $check_failed"
[ "$wrong_bytes" -eq 0 ] && [ "$lost" -eq 0 ] && [ "$check_failed" -eq 0 ]
