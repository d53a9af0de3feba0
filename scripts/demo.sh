#!/usr/bin/env bash
# demo.sh: a first look at vmvault on a fresh machine, in well under a minute.
#
# It builds vmvault, makes a real ext4 disk image, backs it up into a new
# local repository, edits files inside the image with debugfs (a "next day"),
# backs it up again, restores both generations, verifies their SHA-256
# against the images, and runs a full check. Every step says what it stored.
#
# Usage: scripts/demo.sh [--dir DIR] [--size SIZE]
#   --dir DIR    where the image, repository and restores go (default: ./demo-out,
#                emptied first)
#   --size SIZE  size of the disk image, as for truncate (default 256M)
#
# Needs Go and, if missing, installs e2fsprogs (mkfs.ext4, debugfs, e2fsck)
# from Debian's packages. Exits non-zero on any failure or mismatch.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$repo_root/demo-out"
size=256M

while [ $# -gt 0 ]; do
	case "$1" in
	--dir) out=$2; shift 2 ;;
	--size) size=$2; shift 2 ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "demo: unknown argument: $1 (try --help)" >&2; exit 2 ;;
	esac
done

step_no=0
step() { step_no=$((step_no + 1)); printf '\n== %d. %s  [%ds]\n' "$step_no" "$*" "$SECONDS"; }
info() { printf '   %s\n' "$*"; }
fail() { printf '\nDEMO FAILED: %s\n' "$*" >&2; exit 1; }
human() { numfmt --to=iec-i --suffix=B --format='%.1f' "$1"; }

# run LOG CMD...: runs CMD with its stderr in LOG; on failure shows LOG and stops.
run() {
	local log=$1; shift
	if ! "$@" 2>"$log"; then
		sed 's/^/   | /' "$log" >&2
		fail "command failed: $*"
	fi
}

# json_field NAME FILE: the value of a top-level scalar field of a one-object JSON file.
json_field() {
	if command -v jq >/dev/null 2>&1; then
		jq -er --arg k "$1" '.[$k]' "$2"
	else
		# Enough for the flat objects vmvault prints: "key": "string" or "key": number.
		tr -d '\n' <"$2" | sed -nE 's/.*"'"$1"'"[[:space:]]*:[[:space:]]*("([^"]*)"|([-0-9.eE+]+)).*/\2\3/p'
	fi
}

# apt_install CMD PACKAGE: installs PACKAGE from Debian's packages, quietly, when
# CMD is missing; returns non-zero if that fails.
apt_updated=
apt_install() {
	command -v "$1" >/dev/null 2>&1 && return 0
	local sudo=
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	info "installing $2 (for $1)"
	if [ -z "$apt_updated" ]; then
		$sudo apt-get update -qq >/dev/null || return 1
		apt_updated=1
	fi
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null 2>&1
}
need() { apt_install "$@" || fail "could not install $2; install it and run the demo again"; }

export PATH="$PATH:/usr/sbin:/sbin"

step "Tools"
command -v go >/dev/null || fail "Go is not installed (needed to build vmvault)"
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need e2fsck e2fsprogs
apt_install jq jq || info "jq unavailable: parsing vmvault's JSON with sed"
info "go: $(go version | cut -d' ' -f3), $(mkfs.ext4 -V 2>&1 | head -1)"

rm -rf "$out"
mkdir -p "$out/bin" "$out/tree" "$out/logs"
out=$(cd "$out" && pwd)
vmvault="$out/bin/vmvault"

step "Build vmvault"
(cd "$repo_root" && go build -o "$vmvault" ./cmd/vmvault) || fail "go build ./cmd/vmvault failed"
info "built $vmvault"

step "Make a real ext4 disk image ($size, sparse) from a folder"
tree="$out/tree"
mkdir -p "$tree/etc" "$tree/home/alice" "$tree/var/log" "$tree/srv/data" "$tree/usr/share/doc"
printf 'demo-vm\n' >"$tree/etc/hostname"
for i in $(seq 1 40); do
	printf 'note %d: the quick brown fox jumps over the lazy dog\n' $(seq 1 200) >"$tree/home/alice/note-$i.txt"
done
seq 1 200000 | sed 's/^/Jan  1 00:00:00 demo-vm app[42]: request served, id=/' >"$tree/var/log/app.log"
for i in 1 2 3 4; do
	head -c 2M /dev/urandom >"$tree/srv/data/blob-$i.bin" # incompressible
done
# Real, varied files: some of this machine's documentation.
mapfile -t docs < <(find /usr/share/doc -maxdepth 1 -mindepth 1 -type d 2>/dev/null | sort)
for d in "${docs[@]:0:60}"; do cp -r "$d" "$tree/usr/share/doc/" 2>/dev/null || true; done
image="$out/disk.raw"
truncate -s "$size" "$image"
run "$out/logs/mkfs.log" mkfs.ext4 -q -F -L demo -d "$tree" "$image"
info "$(du -sh --apparent-size "$tree" | cut -f1) of files in $(find "$tree" -type f | wc -l) files;" \
	"image $(human "$(stat -c %s "$image")"), $(human "$(($(stat -c %b "$image") * 512))") allocated"
sha_day1=$(sha256sum "$image" | cut -d' ' -f1)
info "sha256 $sha_day1"

step "Create a repository"
pw="$out/password"
(umask 077 && head -c 24 /dev/urandom | base64 >"$pw")
chmod 600 "$pw"
export VMVAULT_REPOSITORY="$out/repo" VMVAULT_PASSWORD_FILE="$pw"
run "$out/logs/init.log" "$vmvault" init </dev/null >/dev/null
info "repository $VMVAULT_REPOSITORY, password in $pw (mode 600)"

# backup N: backs the image up as generation N and reports what was stored.
backup() {
	local n=$1 json="$out/backup-$1.json"
	run "$out/logs/backup-$n.log" "$vmvault" backup demo-vm --source "$image" --tag demo --json </dev/null >"$json"
	sed 's/^/   vmvault: /' "$out/logs/backup-$n.log"
	local id read new stored secs
	id=$(json_field id "$json") || fail "no snapshot id in $json"
	read=$(json_field bytes_read "$json") || fail "no bytes_read in $json"
	new=$(json_field bytes_new "$json") || fail "no bytes_new in $json"
	stored=$(json_field bytes_stored "$json") || fail "no bytes_stored in $json"
	secs=$(json_field duration_seconds "$json") || fail "no duration_seconds in $json"
	info "snapshot ${id:0:8}: read $(human "$read"), new data $(human "$new")," \
		"stored $(human "$stored") (after dedup + zstd + encryption) in $(printf '%.2f' "$secs") s"
	info "repository now $(human "$(du -sb "$VMVAULT_REPOSITORY" | cut -f1)")"
	last_id=$id
}

step "Back up the image (first generation: everything is new)"
backup 1
id_1=$last_id

step "Next day: change files inside the image with debugfs -w"
seq 1 5000 | sed 's/^/Jan  2 00:00:00 demo-vm app[42]: request served, id=/' >"$out/app2.log"
printf 'demo-vm-renamed\n' >"$out/hostname"
head -c 1M /dev/urandom >"$out/upload.bin"
cat >"$out/changes.debugfs" <<EOF
write $out/upload.bin /srv/data/upload-day2.bin
rm /etc/hostname
write $out/hostname /etc/hostname
rm /var/log/app.log
write $out/app2.log /var/log/app.log
rm /srv/data/blob-4.bin
EOF
run "$out/logs/debugfs.log" debugfs -w -f "$out/changes.debugfs" "$image" >/dev/null
# debugfs exits 0 even when a command fails; its only stderr line on success is its banner.
if grep -v '^debugfs [0-9]' "$out/logs/debugfs.log" | grep -q .; then
	sed 's/^/   | /' "$out/logs/debugfs.log"
	fail "debugfs reported errors"
fi
run "$out/logs/fsck-day2.log" e2fsck -fn "$image" >/dev/null
info "added /srv/data/upload-day2.bin (1 MiB random), rewrote /etc/hostname and /var/log/app.log," \
	"deleted /srv/data/blob-4.bin; e2fsck: clean"
sha_day2=$(sha256sum "$image" | cut -d' ' -f1)
info "sha256 $sha_day2"

step "Back up again (second generation: only changed data is stored)"
backup 2

step "List snapshots"
run "$out/logs/snapshots.log" "$vmvault" snapshots demo-vm </dev/null | sed 's/^/   /'

step "Restore the latest generation to a file and verify it"
restored="$out/restored-latest.raw"
run "$out/logs/restore-latest.log" "$vmvault" restore demo-vm latest </dev/null >"$restored"
got=$(sha256sum "$restored" | cut -d' ' -f1)
info "sha256 $got"
[ "$got" = "$sha_day2" ] || fail "restored image differs from the image backed up (want $sha_day2)"
run "$out/logs/fsck-restored.log" e2fsck -fn "$restored" >/dev/null
info "identical to the day-2 image; e2fsck: clean"

step "Restore the first generation by its ID (a unique prefix is enough) and verify it"
restored1="$out/restored-${id_1:0:8}.raw"
run "$out/logs/restore-1.log" "$vmvault" restore demo-vm "${id_1:0:8}" </dev/null >"$restored1"
got=$(sha256sum "$restored1" | cut -d' ' -f1)
info "sha256 $got"
[ "$got" = "$sha_day1" ] || fail "restored first generation differs from the day-1 image (want $sha_day1)"
info "identical to the day-1 image"

step "Check the repository, reading and decrypting all data"
run "$out/logs/check.log" "$vmvault" check --read-data </dev/null >"$out/check.out"
cat "$out/check.out" "$out/logs/check.log" | sed 's/^/   /'

printf '\nDEMO OK in %d s: two generations backed up, both restored byte-identical, repository checked.\n' "$SECONDS"
printf 'Everything is in %s (repository: repo/, password: password).\n' "$out"
