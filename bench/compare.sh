#!/usr/bin/env bash
# compare.sh: vmvault against restic on a realistic VM disk image, side by side.
#
# Builds (or reuses from the cache) a reference ext4 image and its "next day"
# with bench/mkimage.sh, then for each tool, with a fresh local repository:
#   full backup of the image, incremental backup of the next-day image,
#   restore of the latest generation to stdout (/dev/null), timed; and once,
#   untimed, a restore piped into sha256sum to prove it is byte-identical.
# Reports wall time, CPU time (user+sys) and peak RSS (GNU time), the bytes
# each repository grew by (du -sb), and the ratios vmvault/restic against the
# targets in docs/performance.md. It never fails on timings; it fails when a
# tool fails or a restore differs.
#
# Usage: bench/compare.sh [options]
#   --size SIZE     image size (default 4G)
#   --quick         smoke run: 512M image, plain minbase root filesystem,
#                   48 MiB random data, 16 MiB log
#   --tools LIST    comma-separated subset of restic,vmvault (default both)
#   --runs N        repeat everything N times with fresh repositories, tools
#                   interleaved; report medians (peak RSS: the maximum) (default 1)
#   --vmvault BIN   use this vmvault binary instead of building ./cmd/vmvault
#   --sftp          also run both tools against SFTP repositories on a private
#                   sshd on 127.0.0.1 (tools restic-sftp, vmvault-sftp)
#   --workdir DIR   repositories and logs (default: a new temp dir, removed at the end)
#   --keep          keep the work dir
#   --cache DIR     image cache (default ${XDG_CACHE_HOME:-~/.cache}/vmvault-bench)
#   --rebuild       rebuild the images
#
# Needs root (debootstrap). Installs debootstrap, e2fsprogs, restic and time
# from Debian's packages if missing. Also writes the results as TSV and as
# Markdown table rows to the cache's results/ folder.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
size=4G
quick=
tools=restic,vmvault
sftp=
workdir=
keep=
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vmvault-bench"
rebuild=
vmvault_bin=
runs=1

while [ $# -gt 0 ]; do
	case "$1" in
	--size) size=$2; shift 2 ;;
	--quick) quick=1; size=512M; shift ;;
	--tools) tools=$2; shift 2 ;;
	--runs) runs=$2; shift 2 ;;
	--vmvault) vmvault_bin=$2; shift 2 ;;
	--sftp) sftp=1; shift ;;
	--workdir) workdir=$2; shift 2 ;;
	--keep) keep=1; shift ;;
	--cache) cache=$2; shift 2 ;;
	--rebuild) rebuild=1; shift ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "compare: unknown argument: $1 (try --help)" >&2; exit 2 ;;
	esac
done

say() { printf '%s\n' "$*" >&2; }
die() { printf 'compare: error: %s\n' "$*" >&2; exit 1; }
has_tool() { [[ ",$tools," == *",$1,"* ]]; }
export PATH="$PATH:/usr/sbin:/sbin"

[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "--runs needs a positive number"
if [ -n "$sftp" ]; then
	tools="$tools,$(sed 's/\([a-z]*\)/\1-sftp/g' <<<"$tools")"
fi

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap for the reference image)"
apt_updated=
need() { # need CMD PACKAGE
	command -v "$1" >/dev/null 2>&1 && return 0
	say "installing $2"
	if [ -z "$apt_updated" ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 || die "could not install $2"
}
[ -x /usr/bin/time ] || { need __none__ time; }
has_tool restic && need restic restic
command -v go >/dev/null || die "Go is needed to build vmvault and bench/blockdiff"

# --- Work dir. Tools' caches go into it too, so runs start equal and leave nothing behind. ---
if [ -z "$workdir" ]; then
	workdir=$(mktemp -d "${TMPDIR:-/tmp}/vmvault-bench.XXXXXX")
else
	mkdir -p "$workdir"
	workdir=$(cd "$workdir" && pwd)
fi
if [ -z "$keep" ]; then
	trap 'stop_sshd; rm -rf "$workdir"' EXIT
else
	trap 'stop_sshd' EXIT
fi
mkdir -p "$workdir/logs" "$workdir/time"

# --- A private sshd on 127.0.0.1 for the SFTP runs (root login by key). ---
sshd_pid=
stop_sshd() { [ -z "$sshd_pid" ] || kill "$sshd_pid" 2>/dev/null || true; }
if [ -n "$sftp" ]; then
	need /usr/sbin/sshd openssh-server
	ssh_dir="$workdir/ssh"
	mkdir -p "$ssh_dir" /run/sshd
	chmod 711 "$workdir" "$ssh_dir"
	ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/host_key"
	ssh-keygen -q -t ed25519 -N '' -f "$ssh_dir/client_key"
	cp "$ssh_dir/client_key.pub" "$ssh_dir/authorized_keys"
	listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
	sshd_port=$((20000 + RANDOM % 40000))
	while listening "$sshd_port"; do sshd_port=$((20000 + RANDOM % 40000)); done
	cat >"$ssh_dir/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $sshd_port
HostKey $ssh_dir/host_key
PidFile $ssh_dir/sshd.pid
AuthorizedKeysFile $ssh_dir/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
CONF
	echo "[127.0.0.1]:$sshd_port $(cat "$ssh_dir/host_key.pub")" >"$ssh_dir/known_hosts"
	/usr/sbin/sshd -D -e -f "$ssh_dir/sshd_config" >"$workdir/logs/sshd.log" 2>&1 &
	sshd_pid=$!
	for _ in $(seq 50); do
		listening "$sshd_port" && break
		sleep 0.1
	done
	ssh_cmd="ssh -p $sshd_port -i $ssh_dir/client_key -o UserKnownHostsFile=$ssh_dir/known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes root@127.0.0.1 -s sftp"
fi

# --- Images. ---
mk=(--size "$size" --cache "$cache")
if [ -n "$rebuild" ]; then
	mk+=(--rebuild)
fi
if [ -n "$quick" ]; then
	mk+=(--packages "" --random-mib 48 --log-mib 16 --db-mib 8 --tar-usr no)
fi
imgdir=$("$repo_root/bench/mkimage.sh" "${mk[@]}") || die "bench/mkimage.sh failed"
base="$imgdir/base.raw"
next="$imgdir/next.raw"
info() { sed -n "s/^$1=//p" "$imgdir/info"; }
sha_next=$(info sha256_next)

export XDG_CACHE_HOME="$workdir/cache"

if has_tool vmvault || has_tool vmvault-sftp; then
	if [ -n "$vmvault_bin" ]; then
		cp "$vmvault_bin" "$workdir/vmvault" || die "cannot copy $vmvault_bin"
	else
		say "building vmvault"
		(cd "$repo_root" && go build -o "$workdir/vmvault" ./cmd/vmvault) || die "go build ./cmd/vmvault failed"
	fi
fi

# warm FILE: one untimed read so the timed run reads from page cache, for
# every tool alike (dropping caches is not possible in every container).
warm() { cat "$1" >/dev/null; }

# measure TOOL STEP IMAGE CMD...: runs CMD under GNU time, with "@IMG@" in
# its arguments replaced by IMAGE, and stdin from IMAGE if CMD's tool reads
# the image from stdin (restic --stdin), else from /dev/null. Records wall,
# user and sys seconds and peak RSS of this round.
measure() {
	local tool=$1 step=$2 img=$3; shift 3
	local tf="$workdir/time/$tool-$step.t$round" log="$workdir/logs/$tool-$step.$round.log" in=/dev/null
	local args=("${@//@IMG@/$img}")
	[[ " $* " == *" --stdin "* ]] && in=$img
	if ! /usr/bin/time -f '%e %U %S %M' -o "$tf" "${args[@]}" <"$in" 2>"$log"; then
		sed 's/^/  | /' "$log" >&2
		die "$tool $step failed: ${args[*]}"
	fi
	# After a failure GNU time puts a "Command exited ..." line first: the numbers are the last line.
	tail -n 1 "$tf" >"$workdir/time/$tool-$step.r$round"
}

# repo_bytes DIR: bytes in a repository.
repo_bytes() { du -sb "$1" | cut -f1; }

# run_tool TOOL: one round of the three timed steps for one tool, in a new
# repository; in the first round also the verification.
run_tool() {
	local tool=$1 repo="$workdir/repo-$1-$round" pw="$workdir/password-$1"
	(umask 077 && head -c 24 /dev/urandom | base64 >"$pw")
	local before backup restore
	case "$tool" in
	restic | restic-sftp)
		local ropt=()
		export RESTIC_PASSWORD_FILE="$pw" RESTIC_REPOSITORY="$repo"
		if [ "$tool" = restic-sftp ]; then
			RESTIC_REPOSITORY="sftp:root@127.0.0.1:$repo"
			ropt=(-o "sftp.command=$ssh_cmd")
		fi
		restic "${ropt[@]}" init >"$workdir/logs/$tool-init.$round.log" 2>&1 || die "$tool init failed"
		backup=(restic "${ropt[@]}" backup --quiet --stdin --stdin-filename disk.raw)
		restore=(restic "${ropt[@]}" dump --quiet latest disk.raw)
		;;
	vmvault | vmvault-sftp)
		local vopt=()
		export VMVAULT_PASSWORD_FILE="$pw" VMVAULT_REPOSITORY="$repo"
		if [ "$tool" = vmvault-sftp ]; then
			VMVAULT_REPOSITORY="sftp://root@127.0.0.1:$sshd_port$repo"
			vopt=(--ssh-key "$ssh_dir/client_key" --known-hosts "$ssh_dir/known_hosts")
		fi
		"$workdir/vmvault" init "${vopt[@]}" </dev/null >"$workdir/logs/$tool-init.$round.log" 2>&1 || die "$tool init failed"
		backup=("$workdir/vmvault" backup benchvm --source @IMG@ "${vopt[@]}")
		restore=("$workdir/vmvault" restore benchvm latest "${vopt[@]}")
		;;
	*) die "unknown tool $tool" ;;
	esac
	say "$tool (run $round of $runs): full backup"
	warm "$base"
	before=$(repo_bytes "$repo")
	measure "$tool" full "$base" "${backup[@]}" >/dev/null
	echo $(($(repo_bytes "$repo") - before)) >"$workdir/time/$tool-full.g$round"
	say "$tool: incremental backup"
	warm "$next"
	before=$(repo_bytes "$repo")
	measure "$tool" incr "$next" "${backup[@]}" >/dev/null
	echo $(($(repo_bytes "$repo") - before)) >"$workdir/time/$tool-incr.g$round"
	say "$tool: restore to /dev/null"
	"${restore[@]}" </dev/null >/dev/null 2>"$workdir/logs/$tool-warmrestore.log" || die "$tool restore failed (warm-up)"
	measure "$tool" restore "" "${restore[@]}" >/dev/null
	echo 0 >"$workdir/time/$tool-restore.g$round"
	if [ "$round" -gt 1 ]; then
		rm -rf "$repo"
		return
	fi
	say "$tool: verifying the restore (sha256, untimed)"
	local got
	got=$("${restore[@]}" </dev/null 2>"$workdir/logs/$tool-verify.log" | sha256sum | cut -d' ' -f1)  || die "$tool restore failed (verification)"
	[ "$got" = "$sha_next" ] || die "$tool restored an image that differs: sha256 $got, want $sha_next"
	# Later rounds need the disk space more than this repository.
	[ "$runs" -eq 1 ] || rm -rf "$repo"
}

IFS=, read -r -a tool_list <<<"$tools"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq 1 "$runs"); do
	for t in "${tool_list[@]}"; do run_tool "$t"; done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# --- Report. ---
val() { # val TOOL STEP FIELD(wall|cpu|rss|grew): median over the runs (rss: maximum)
	local rounds=("$workdir/time/$1-$2".r*)
	[ -e "${rounds[0]}" ] || { echo -; return; }
	case "$3" in
	wall) awk '{ print $1 }' "${rounds[@]}" | median "%.2f" ;;
	cpu) awk '{ print $2 + $3 }' "${rounds[@]}" | median "%.2f" ;;
	rss) awk '{ print $4 / 1024 }' "${rounds[@]}" | sort -g | tail -n 1 | xargs printf "%.0f" ;;
	grew) cat "$workdir/time/$1-$2".g* | median "%d" ;;
	esac
}
median() { # median FORMAT: the median of the numbers on stdin
	sort -g | awk -v fmt="$1" '{ a[NR] = $1 } END { printf fmt, (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
mib() {
	if [ "$1" = - ]; then echo -; else awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; fi
}
ratio() { [ "$1" = - ] || [ "$2" = - ] && { echo -; return; }; awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
target() { # target STEP FIELD -> the target ratio, or empty
	case "$1/$2" in
	full/wall) echo 0.50 ;; incr/wall) echo 0.25 ;; restore/wall) echo 0.50 ;; incr/grew) echo 1.00 ;;
	esac
}
verdict() { # verdict RATIO TARGET
	if [ -z "$2" ] || [ "$1" = - ]; then
		echo ""
		return
	fi
	awk -v r="$1" -v t="$2" 'BEGIN { print (r <= t ? "met (<= " t ")" : "missed (<= " t ")") }'
}

mkdir -p "$cache/results"
stamp="$(date +%Y%m%dT%H%M%S)-$(basename "$imgdir")"
tsv="$cache/results/$stamp.tsv"
md="$cache/results/$stamp.md"
printf 'step\ttool\twall_s\tcpu_s\tpeak_rss_mib\trepo_grew_bytes\n' >"$tsv"
{
	echo "| step | restic wall s | vmvault wall s | ratio | restic CPU s | vmvault CPU s | restic RSS MiB | vmvault RSS MiB | restic grew MiB | vmvault grew MiB | growth ratio |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|"
} >"$md"

machine="$(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(free -g | awk '/Mem:/ { print $2 }') GiB RAM, kernel $(uname -r)"
echo
echo "vmvault vs restic: $(basename "$imgdir")"
echo "  machine: $machine"
has_tool restic && echo "  restic:  $(restic version | head -n 1)"
has_tool vmvault && echo "  vmvault: $(cd "$repo_root" && git describe --always --dirty 2>/dev/null || echo unknown), $(go version | cut -d' ' -f3)"
echo "  image:   $(info size | awk '{ printf "%.2f GiB", $1 / 1073741824 }'), $(info rootfs)," \
	"non-zero $(awk -v n="$(info nonzero_old)" -v b="$(info block)" 'BEGIN { printf "%.2f GiB", n * b / 1073741824 }')," \
	"next day changed $(info changed) of $(info blocks) 4 KiB blocks ($(info changed_pct) %)"
echo "  load average (1/5/15 min): $load_before before the runs, $load_after after; other work skews wall times"
[ "$runs" -eq 1 ] || echo "  runs:    $runs, tools interleaved, fresh repositories each; medians shown (peak RSS: maximum)"
echo "  page cache: not dropped; each image was read once, untimed, before its backup,"
echo "              and each restore ran once, untimed, before the timed one: all reads come from memory."
echo "  restores verified: sha256 of the restored image equals the next-day image's ($sha_next)."
echo
printf '%-12s %-8s %9s %9s %9s %13s\n' step tool "wall s" "CPU s" "RSS MiB" "repo grew MiB"
for step in full incr restore; do
	for t in restic vmvault restic-sftp vmvault-sftp; do
		has_tool "$t" || continue
		w=$(val "$t" "$step" wall) c=$(val "$t" "$step" cpu) r=$(val "$t" "$step" rss) g=$(val "$t" "$step" grew)
		printf '%-12s %-8s %9s %9s %9s %13s\n' "$step" "$t" "$w" "$c" "$r" "$(mib "$g")"
		printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$step" "$t" "$w" "$c" "$r" "$g" >>"$tsv"
	done
done
for step in full incr restore; do
	grew_ratio=$(ratio "$(val vmvault "$step" grew)" "$(val restic "$step" grew)")
	[ "$step" != restore ] || grew_ratio=-
	printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$step" \
		"$(val restic "$step" wall)" "$(val vmvault "$step" wall)" \
		"$(ratio "$(val vmvault "$step" wall)" "$(val restic "$step" wall)")" \
		"$(val restic "$step" cpu)" "$(val vmvault "$step" cpu)" \
		"$(val restic "$step" rss)" "$(val vmvault "$step" rss)" \
		"$(mib "$(val restic "$step" grew)")" "$(mib "$(val vmvault "$step" grew)")" "$grew_ratio" >>"$md"
done
if has_tool restic && has_tool vmvault; then
	echo
	echo "ratios vmvault/restic (lower is better):"
	printf '%-12s %-24s %-9s %-24s %-24s\n' step wall CPU "peak RSS" "repo growth"
	for step in full incr restore; do
		cols=()
		for f in wall cpu rss grew; do
			r=$(ratio "$(val vmvault "$step" "$f")" "$(val restic "$step" "$f")")
			[ "$step/$f" = restore/grew ] && r=-
			cols+=("$r $(verdict "$r" "$(target "$step" "$f")")")
		done
		printf '%-12s %-24s %-9s %-24s %-24s\n' "$step" "${cols[@]}"
	done
	peak=0
	for step in full incr restore; do
		r=$(val vmvault "$step" rss)
		[ "$r" != - ] && [ "$r" -gt "$peak" ] && peak=$r
	done
	echo "vmvault peak RSS over all steps: $peak MiB ($( [ "$peak" -le 200 ] && echo met || echo missed ) (<= 200 MiB))"
fi
if has_tool vmvault-sftp; then
	echo
	echo "SFTP (loopback sshd): wall-time ratios"
	printf '%-12s %-34s %-34s\n' step "vmvault-sftp / vmvault (local)" "vmvault-sftp / restic-sftp"
	for step in full incr restore; do
		a=$(ratio "$(val vmvault-sftp "$step" wall)" "$(val vmvault "$step" wall)")
		b=$(ratio "$(val vmvault-sftp "$step" wall)" "$(val restic-sftp "$step" wall)")
		ta=; tb=
		[ "$step" = full ] && ta=1.30 && tb=0.50
		printf '%-12s %-34s %-34s\n' "$step" "$a $(verdict "$a" "$ta")" "$b $(verdict "$b" "$tb")"
	done
fi
echo
echo "results: $tsv, $md (rows for docs/performance.md)${keep:+; work dir kept: $workdir}"
