#!/usr/bin/env bash
# compare.sh: vmvault against restic on a realistic VM disk image, side by side.
#
# Builds (or reuses from the cache) a reference ext4 image and its "next day"
# with bench/mkimage.sh, then for each tool, with a fresh local repository:
#   full backup of the image, incremental backup of the next-day image,
#   restore of the latest generation to stdout (/dev/null), timed; and once,
#   untimed, a restore piped into sha256sum to prove it is byte-identical.
# Further scenarios (--scenarios), each timed with its repository growth:
#   blocks  a "block writes" next day: random 4 KiB blocks of the image
#           overwritten below the file system (bench/blockwrite, the same
#           share as the file-system next day), backed up into the same
#           repository (step blk);
#   qcow2   the image and its next day converted to qcow2 by qemu-img
#           convert, so content moves by whole clusters: full and
#           incremental into a new repository (steps qfull, qincr);
#   sparse  a 64 GiB sparse image holding the image twice (at 0 and at
#           32 GiB): vmvault backs it up once untimed, then again unchanged
#           (step sparse), against `cat IMAGE > /dev/null` (tool cat).
# Reports wall time, CPU time (user+sys) and peak RSS (GNU time), the bytes
# each repository grew by (du -sb), and the ratios vmvault/restic against the
# targets in docs/performance.md. It never fails on timings; it fails when a
# tool fails or a restore differs.
#
# Usage: bench/compare.sh [options]
#   --size SIZE     image size (default 4G)
#   --quick         smoke run: 512M image, plain minbase root filesystem,
#                   48 MiB random data, 16 MiB log
#   --tools LIST    comma-separated subset of restic,vmvault (default both;
#                   restic019 is added when its binary exists)
#   --restic019 BIN restic 0.19.1 for a second comparison (default
#                   /tmp/restic019/restic, built by: GOBIN=/tmp/restic019 go
#                   install github.com/restic/restic/cmd/restic@v0.19.1)
#   --scenarios L   comma-separated subset of blocks,qcow2,sparse (default all;
#                   "" for only the file-system next day)
#   --image-opts S  extra bench/mkimage.sh options (shell syntax), for a
#                   second, different image
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
restic019=/tmp/restic019/restic
scenarios=blocks,qcow2,sparse
image_opts=

while [ $# -gt 0 ]; do
	case "$1" in
	--size) size=$2; shift 2 ;;
	--quick) quick=1; size=512M; shift ;;
	--tools) tools=$2; shift 2 ;;
	--runs) runs=$2; shift 2 ;;
	--vmvault) vmvault_bin=$2; shift 2 ;;
	--restic019) restic019=$2; shift 2 ;;
	--scenarios) scenarios=$2; shift 2 ;;
	--image-opts) image_opts=$2; shift 2 ;;
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
has_scenario() { [[ ",$scenarios," == *",$1,"* ]]; }
export PATH="$PATH:/usr/sbin:/sbin"

[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "--runs needs a positive number"
if [ -x "$restic019" ] && has_tool restic && ! has_tool restic019; then
	tools="$tools,restic019"
fi
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
# Parsed like a shell command line, so quotes work: --image-opts '--packages ""'.
[ -z "$image_opts" ] || eval "mk+=($image_opts)"
imgdir=$("$repo_root/bench/mkimage.sh" "${mk[@]}") || die "bench/mkimage.sh failed"
base="$imgdir/base.raw"
next="$imgdir/next.raw"
info() { sed -n "s/^$1=//p" "$imgdir/info"; }
sha_next=$(info sha256_next)

# --- Scenario images, cached beside the image. ---
blocks_img="$imgdir/blocks.raw"
if has_scenario blocks && [ ! -e "$imgdir/blocks.done" ]; then
	say "block-writes next day: $(info changed_pct) % of blocks overwritten in place"
	cp --sparse=always "$base" "$blocks_img.tmp"
	(cd "$repo_root" && go run ./bench/blockwrite -pct "$(info changed_pct)" -seed 1 "$blocks_img.tmp") >"$imgdir/blocks.count" ||
		die "bench/blockwrite failed"
	mv "$blocks_img.tmp" "$blocks_img"
	touch "$imgdir/blocks.done"
fi
if has_scenario qcow2 && [ ! -e "$imgdir/qcow2.done" ]; then
	need qemu-img qemu-utils
	say "qcow2 images (qemu-img convert)"
	qemu-img convert -f raw -O qcow2 "$base" "$imgdir/base.qcow2" || die "qemu-img convert failed"
	qemu-img convert -f raw -O qcow2 "$next" "$imgdir/next.qcow2" || die "qemu-img convert failed"
	touch "$imgdir/qcow2.done"
fi
sparse_img="$imgdir/sparse64.raw"
if has_scenario sparse && [ ! -e "$imgdir/sparse.done" ]; then
	say "64 GiB sparse image (the image at 0 and at 32 GiB)"
	rm -f "$sparse_img"
	truncate -s 64G "$sparse_img"
	dd if="$base" of="$sparse_img" bs=4M conv=sparse,notrunc status=none
	dd if="$next" of="$sparse_img" bs=4M seek=$((32 * 256)) conv=sparse,notrunc status=none
	touch "$imgdir/sparse.done"
fi

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

# new_repo TOOL REPO: creates a repository for TOOL and sets the arrays
# backup and restore to its commands.
new_repo() {
	local tool=$1 repo=$2 pw="$workdir/password-$1"
	[ -e "$pw" ] || (umask 077 && head -c 24 /dev/urandom | base64 >"$pw")
	case "$tool" in
	restic | restic-sftp | restic019)
		local ropt=() bin=restic
		[ "$tool" != restic019 ] || bin=$restic019
		export RESTIC_PASSWORD_FILE="$pw" RESTIC_REPOSITORY="$repo"
		if [ "$tool" = restic-sftp ]; then
			RESTIC_REPOSITORY="sftp:root@127.0.0.1:$repo"
			ropt=(-o "sftp.command=$ssh_cmd")
		fi
		"$bin" "${ropt[@]}" init >"$workdir/logs/$tool-init.$round.log" 2>&1 || die "$tool init failed"
		backup=("$bin" "${ropt[@]}" backup --quiet --stdin --stdin-filename disk.raw)
		restore=("$bin" "${ropt[@]}" dump --quiet latest disk.raw)
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
}

# timed_backup TOOL STEP REPO IMAGE [nowarm]: a timed backup and the
# repository's growth.
timed_backup() {
	local before
	[ "${5:-}" = nowarm ] || warm "$4"
	before=$(repo_bytes "$3")
	measure "$1" "$2" "$4" "${backup[@]}" >/dev/null
	echo $(($(repo_bytes "$3") - before)) >"$workdir/time/$1-$2.g$round"
}

# run_scenarios TOOL: the scenarios beyond the file-system next day, for
# local repositories.
run_scenarios() {
	local tool=$1
	[[ "$tool" != *-sftp ]] || return 0
	if has_scenario blocks; then
		say "$tool: block-writes next day"
		timed_backup "$tool" blk "$workdir/repo-$tool-$round" "$blocks_img"
	fi
	if has_scenario qcow2; then
		local q="$workdir/repo-$tool-q$round"
		new_repo "$tool" "$q"
		say "$tool: qcow2 full and incremental (content moved by qemu-img convert)"
		timed_backup "$tool" qfull "$q" "$imgdir/base.qcow2"
		timed_backup "$tool" qincr "$q" "$imgdir/next.qcow2"
		rm -rf "$q"
	fi
	if has_scenario sparse && [ "$tool" = vmvault ]; then
		local sp="$workdir/repo-$tool-s$round"
		new_repo "$tool" "$sp"
		say "$tool: 64 GiB sparse image, first backup (untimed), then unchanged (timed)"
		"${backup[@]//@IMG@/$sparse_img}" </dev/null >/dev/null 2>"$workdir/logs/$tool-sparse-first.log" || die "$tool sparse backup failed"
		# The first backup read the data into the page cache; warming
		# with cat would read 60 GiB of holes for nothing.
		timed_backup "$tool" sparse "$sp" "$sparse_img" nowarm
		rm -rf "$sp"
		say "cat: reading the 64 GiB sparse image"
		measure cat sparse "$sparse_img" cat "$sparse_img" >/dev/null
	fi
}

# run_tool TOOL: one round of the three timed steps for one tool, in a new
# repository; in the first round also the verification; then the scenarios.
run_tool() {
	local tool=$1 repo="$workdir/repo-$1-$round"
	local before backup restore
	new_repo "$tool" "$repo"
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
	# The backups just wrote the repository: write it out first, so the
	# timed restore does not share the disk with that writeback (as in
	# bench/restore.sh).
	sync -f "$repo"
	"${restore[@]}" </dev/null >/dev/null 2>"$workdir/logs/$tool-warmrestore.log" || die "$tool restore failed (warm-up)"
	measure "$tool" restore "" "${restore[@]}" >/dev/null
	echo 0 >"$workdir/time/$tool-restore.g$round"
	if [ "$round" -eq 1 ]; then
		say "$tool: verifying the restore (sha256, untimed)"
		local got
		got=$("${restore[@]}" </dev/null 2>"$workdir/logs/$tool-verify.log" | sha256sum | cut -d' ' -f1) || die "$tool restore failed (verification)"
		[ "$got" = "$sha_next" ] || die "$tool restored an image that differs: sha256 $got, want $sha_next"
	fi
	run_scenarios "$tool"
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
	full/wall | qfull/wall | restore/wall | qincr/wall) echo 0.50 ;;
	incr/wall | blk/wall) echo 0.20 ;;
	incr/grew | blk/grew) echo 1.00 ;;
	qincr/grew) echo 1.20 ;;
	esac
}
verdict() { # verdict RATIO TARGET
	if [ -z "$2" ] || [ "$1" = - ]; then
		echo ""
		return
	fi
	awk -v r="$1" -v t="$2" 'BEGIN { print (r <= t ? "met (<= " t ")" : "missed (<= " t ")") }'
}

steps="full incr restore"
has_scenario blocks && steps="$steps blk"
has_scenario qcow2 && steps="$steps qfull qincr"

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
for step in $steps sparse; do
	for t in restic restic019 vmvault restic-sftp vmvault-sftp cat; do
		[ "$step" != sparse ] || [ "$t" = vmvault ] || [ "$t" = cat ] || continue
		has_tool "$t" || continue
		w=$(val "$t" "$step" wall) c=$(val "$t" "$step" cpu) r=$(val "$t" "$step" rss) g=$(val "$t" "$step" grew)
		printf '%-12s %-8s %9s %9s %9s %13s\n' "$step" "$t" "$w" "$c" "$r" "$(mib "$g")"
		printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$step" "$t" "$w" "$c" "$r" "$g" >>"$tsv"
	done
done
for step in $steps; do
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
	for step in $steps; do
		cols=()
		for f in wall cpu rss grew; do
			r=$(ratio "$(val vmvault "$step" "$f")" "$(val restic "$step" "$f")")
			[ "$step/$f" = restore/grew ] && r=-
			cols+=("$r $(verdict "$r" "$(target "$step" "$f")")")
		done
		printf '%-12s %-24s %-9s %-24s %-24s\n' "$step" "${cols[@]}"
	done
	peak=0
	for step in $steps sparse; do
		r=$(val vmvault "$step" rss)
		[ "$r" != - ] && [ "$r" -gt "$peak" ] && peak=$r
	done
	echo "vmvault peak RSS over all steps: $peak MiB ($( [ "$peak" -le 200 ] && echo met || echo missed ) (<= 200 MiB))"
	if has_tool restic019; then
		echo
		echo "ratios vmvault/restic 0.19.1 (lower is better):"
		printf '%-12s %-24s %-9s %-24s\n' step wall CPU "repo growth"
		for step in $steps; do
			w=$(ratio "$(val vmvault "$step" wall)" "$(val restic019 "$step" wall)")
			c=$(ratio "$(val vmvault "$step" cpu)" "$(val restic019 "$step" cpu)")
			g=$(ratio "$(val vmvault "$step" grew)" "$(val restic019 "$step" grew)")
			[ "$step" != restore ] || g=-
			printf '%-12s %-24s %-9s %-24s\n' "$step" "$w" "$c" "$g"
		done
	fi
fi
if has_scenario sparse && has_tool vmvault; then
	r=$(ratio "$(val vmvault sparse wall)" "$(val cat sparse wall)")
	echo
	echo "64 GiB sparse image, unchanged: vmvault $(val vmvault sparse wall) s, cat $(val cat sparse wall) s:" \
		"ratio $r $(verdict "$r" 0.10); vmvault grew $(mib "$(val vmvault sparse grew)") MiB"
fi
if has_tool vmvault-sftp; then
	echo
	echo "SFTP (loopback sshd): wall-time ratios"
	printf '%-12s %-34s %-34s\n' step "vmvault-sftp / vmvault (local)" "vmvault-sftp / restic-sftp"
	for step in $steps; do
		a=$(ratio "$(val vmvault-sftp "$step" wall)" "$(val vmvault "$step" wall)")
		b=$(ratio "$(val vmvault-sftp "$step" wall)" "$(val restic-sftp "$step" wall)")
		ta=; tb=
		[ "$step" = full ] && ta=1.30 && tb=0.50
		printf '%-12s %-34s %-34s\n' "$step" "$a $(verdict "$a" "$ta")" "$b $(verdict "$b" "$tb")"
	done
fi
echo
echo "results: $tsv, $md (rows for docs/performance.md)${keep:+; work dir kept: $workdir}"
