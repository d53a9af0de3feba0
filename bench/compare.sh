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
#   --sftp          also run against SFTP repositories (not implemented yet)
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

# ---------------------------------------------------------------------------
# SFTP HOOK (not implemented yet). To add SFTP runs:
#   1. start a private sshd on 127.0.0.1 with a free high port and its own
#      config, host key and authorized_keys in the work dir (recipe in
#      shared/TEST-ENVIRONMENT.md, "OpenSSH sshd for SFTP tests");
#   2. for restic use the repository "sftp:USER@127.0.0.1:/DIR" with
#      -o sftp.command="ssh -p PORT -i KEY -o UserKnownHostsFile=... USER@127.0.0.1 -s sftp";
#      for vmvault the SFTP repository syntax of its backend;
#   3. let run_tool take the repository location, call it for tool names
#      like "restic-sftp" and "vmvault-sftp", and add those names to the
#      report's loops over tools (and a ratio block for the SFTP pair).
# ---------------------------------------------------------------------------
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "--runs needs a positive number"
if [ -n "$sftp" ]; then
	die "--sftp is not implemented yet (see the SFTP HOOK in $0)"
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
	trap 'rm -rf "$workdir"' EXIT
fi
mkdir -p "$workdir/logs" "$workdir/time"

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

if has_tool vmvault; then
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
	restic)
		export RESTIC_PASSWORD_FILE="$pw" RESTIC_REPOSITORY="$repo"
		restic init >"$workdir/logs/restic-init.$round.log" 2>&1 || die "restic init failed"
		backup=(restic backup --quiet --stdin --stdin-filename disk.raw)
		restore=(restic dump --quiet latest disk.raw)
		;;
	vmvault)
		export VMVAULT_PASSWORD_FILE="$pw" VMVAULT_REPOSITORY="$repo"
		"$workdir/vmvault" init </dev/null >"$workdir/logs/vmvault-init.$round.log" 2>&1 || die "vmvault init failed"
		backup=("$workdir/vmvault" backup benchvm --source @IMG@)
		restore=("$workdir/vmvault" restore benchvm latest)
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
	for t in restic vmvault; do
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
echo
echo "results: $tsv, $md (rows for docs/performance.md)${keep:+; work dir kept: $workdir}"
