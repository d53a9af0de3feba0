#!/usr/bin/env bash
# mkimage.sh: builds the benchmark's reference disk image and its "next day".
#
# The image is a real ext4 filesystem (mkfs.ext4 -d, no mounting) holding a
# debootstrap'd Debian root filesystem, incompressible random files, a
# compressible log, a database-like file, optionally a tar of /usr (data that
# recurs at shifted offsets), and free space. The next-day image is a copy
# changed with debugfs -w the way a day of use changes a server: files
# rewritten, log rotated, uploads added, pages of the database file updated
# in place, some packaged files replaced, some files deleted; about
# --change-pct of the image's blocks.
#
# Usage: bench/mkimage.sh [options]
#   --size SIZE         image size, as for truncate (default 4G)
#   --packages LIST     extra packages for debootstrap --include, comma-separated
#                       ("" for plain minbase; default build-essential,git,python3)
#   --random-mib N      incompressible random data, in 4 MiB files (default 384)
#   --log-mib N         compressible log text (default 256)
#   --db-mib N          database-like random file updated in place (default 64)
#   --tar-usr yes|no    add /var/backups/usr.tar, a tar of the rootfs's /usr (default yes)
#   --change-pct P      target share of blocks the next day changes (default 1.5)
#   --suite NAME        Debian suite (default bookworm)
#   --mirror URL        Debian mirror (default: the first one apt is configured with)
#   --cache DIR         cache (default ${XDG_CACHE_HOME:-~/.cache}/vmvault-bench)
#   --rebuild           build the images again even if cached
#
# Prints the directory holding base.raw, next.raw and info (key=value lines:
# sizes, SHA-256 sums, blocks changed). Needs root (debootstrap) and the
# packages debootstrap, e2fsprogs; installs them if missing.
set -euo pipefail

size=4G
packages=build-essential,git,python3
random_mib=384
log_mib=256
db_mib=64
tar_usr=yes
change_pct=1.5
suite=bookworm
mirror=
cache="${XDG_CACHE_HOME:-$HOME/.cache}/vmvault-bench"
rebuild=

while [ $# -gt 0 ]; do
	case "$1" in
	--size) size=$2; shift 2 ;;
	--packages) packages=$2; shift 2 ;;
	--random-mib) random_mib=$2; shift 2 ;;
	--log-mib) log_mib=$2; shift 2 ;;
	--db-mib) db_mib=$2; shift 2 ;;
	--tar-usr) tar_usr=$2; shift 2 ;;
	--change-pct) change_pct=$2; shift 2 ;;
	--suite) suite=$2; shift 2 ;;
	--mirror) mirror=$2; shift 2 ;;
	--cache) cache=$2; shift 2 ;;
	--rebuild) rebuild=1; shift ;;
	-h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
	*) echo "mkimage: unknown argument: $1 (try --help)" >&2; exit 2 ;;
	esac
done

log() { printf 'mkimage: %s\n' "$*" >&2; }
die() { printf 'mkimage: error: %s\n' "$*" >&2; exit 1; }
export PATH="$PATH:/usr/sbin:/sbin"
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, and device nodes in the root filesystem)"

apt_updated=
need() { # need CMD PACKAGE
	command -v "$1" >/dev/null 2>&1 && return 0
	log "installing $2"
	if [ -z "$apt_updated" ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 || die "could not install $2"
}
need debootstrap debootstrap
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
command -v go >/dev/null || die "Go is needed (for bench/blockdiff)"

# apt_mirror prints the first Debian mirror apt uses for $suite, from
# deb822 .sources files or one-line .list files.
apt_mirror() {
	local f
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -f "$f" ] || continue
		awk -v suite="$suite" '
			BEGIN { RS = ""; FS = "\n" }
			{
				uri = ""; ok = 0; deb = 0
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
					if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) deb = 1
					if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) ok = 1 }
				}
				if (ok && deb && uri != "") { print uri; exit }
			}' "$f"
	done
	{ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
		awk -v suite="$suite" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i+1) == suite) { print $i; exit } }'
}

mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

# --- The root filesystem, cached: debootstrap takes a minute or more. ---
rootfs="$cache/rootfs-$suite-minbase${packages:++$packages}"
if [ ! -e "$rootfs.done" ]; then
	[ -n "$mirror" ] || mirror=$(apt_mirror | head -n 1)
	[ -n "$mirror" ] || die "no Debian mirror for $suite in /etc/apt/sources.list*; pass --mirror URL"
	log "debootstrap --variant=minbase${packages:+ --include=$packages} $suite from $mirror (once; cached in $rootfs)"
	rm -rf "$rootfs.tmp" "$rootfs"
	debootstrap --variant=minbase ${packages:+--include="$packages"} "$suite" "$rootfs.tmp" "$mirror" \
		>"$cache/debootstrap.log" 2>&1 || die "debootstrap failed, see $cache/debootstrap.log"
	rm -rf "$rootfs.tmp/var/cache/apt/archives/"*.deb
	mv "$rootfs.tmp" "$rootfs"
	touch "$rootfs.done"
fi

# --- The images, cached per set of parameters. ---
key=$(printf '%s\n' "$size" "$rootfs" "$random_mib" "$log_mib" "$db_mib" "$tar_usr" "$change_pct" v1 |
	sha256sum | cut -c1-12)
dir="$cache/images/$size-$key"
if [ -z "$rebuild" ] && [ -e "$dir/info" ]; then
	log "using cached images in $dir"
	echo "$dir"
	exit 0
fi
rm -rf "$dir"
mkdir -p "$dir"
stage="$dir/stage"

log "filling the file tree (root filesystem hard-linked, ${random_mib} MiB random, ${log_mib} MiB log, ${db_mib} MiB database file)"
cp -al "$rootfs" "$stage"
mkdir -p "$stage/srv/data" "$stage/var/lib/appdb" "$stage/var/log/app" "$stage/var/backups"
for i in $(seq 1 $((random_mib / 4))); do
	head -c 4M /dev/urandom >"$stage/srv/data/blob-$(printf %04d "$i").bin"
done
head -c "${db_mib}M" /dev/urandom >"$stage/var/lib/appdb/ibdata1"
# loglines KIB SEED: about KIB KiB of varied but compressible log text.
loglines() {
	awk -v kib="$1" -v seed="$2" 'BEGIN {
		srand(seed); n = 0; lim = kib * 1024
		split("GET POST PUT DELETE", m, " "); split("200 200 200 304 404 500", c, " ")
		while (n < lim) {
			l = sprintf("2026-01-%02d %02d:%02d:%02d app[%d]: %s /api/v1/items/%d status=%s bytes=%d in %.3fs\n",
				1 + int(n / (lim / 28 + 1)), int(rand()*24), int(rand()*60), int(rand()*60), 1000 + int(rand()*50),
				m[1 + int(rand()*4)], int(rand()*1000000), c[1 + int(rand()*6)], int(rand()*65536), rand())
			printf "%s", l; n += length(l)
		}
	}'
}
loglines $((log_mib * 1024)) 1 >"$stage/var/log/app/app.log"
if [ "$tar_usr" = yes ]; then
	tar -C "$rootfs" -cf "$stage/var/backups/usr.tar" usr
fi

log "mkfs.ext4 -d into a $size sparse image"
truncate -s "$size" "$dir/base.raw"
mkfs.ext4 -q -F -L bench -d "$stage" "$dir/base.raw" >"$dir/mkfs.log" 2>&1 ||
	die "mkfs.ext4 failed (does the content fit in $size?): $(tail -n 3 "$dir/mkfs.log")"
rm -rf "$stage"

# --- The next day. ---
log "next day: debugfs -w edits aiming at ${change_pct}% of blocks"
cp --sparse=always "$dir/base.raw" "$dir/next.raw"
work="$dir/next-files"
mkdir -p "$work"
size_bytes=$(stat -c %s "$dir/base.raw")
budget_kib=$(awk -v s="$size_bytes" -v p="$change_pct" 'BEGIN { printf "%d", s * p / 100 / 1024 }')
share() { awk -v b="$budget_kib" -v f="$1" 'BEGIN { v = int(b * f); print (v < 4 ? 4 : v) }'; } # KiB
cmds="$work/commands"
: >"$cmds"

# 35 %: rewrite whole data files (new content, freshly allocated blocks).
nblobs=$((random_mib / 4))
rewrite=$(($(share 0.35) / 4096))
[ "$rewrite" -ge 1 ] || rewrite=1
for i in $(seq 1 "$rewrite"); do
	n=$(printf %04d $(((i * 7) % nblobs + 1)))
	head -c 4M /dev/urandom >"$work/blob-$n.bin"
	printf 'rm /srv/data/blob-%s.bin\nwrite %s /srv/data/blob-%s.bin\n' "$n" "$work/blob-$n.bin" "$n" >>"$cmds"
done
# Delete two other data files: their blocks become free for today's writes.
for i in 2 3; do
	n=$(printf %04d $(((i * 11 + 3) % nblobs + 1)))
	grep -q "blob-$n.bin" "$cmds" || printf 'rm /srv/data/blob-%s.bin\n' "$n" >>"$cmds"
done
# 20 %: log rotation, a day of new log.
loglines "$(share 0.20)" 2 >"$work/app.log"
printf '%s\n' "ln /var/log/app/app.log /var/log/app/app.log.1" "unlink /var/log/app/app.log" \
	"write $work/app.log /var/log/app/app.log" >>"$cmds"
# 15 %: new uploads, incompressible.
head -c "$(share 0.15)K" /dev/urandom >"$work/upload.bin"
printf 'write %s /srv/data/upload-day2.bin\n' "$work/upload.bin" >>"$cmds"
# 20 %: database pages updated in place: 16 bytes at the start of scattered 4 KiB pages.
pages=$(($(share 0.20) / 4))
db_pages=$((db_mib * 256))
for i in $(seq 1 "$pages"); do
	printf 'zap_block -f /var/lib/appdb/ibdata1 -o %d -l 16 -p %d %d\n' \
		$(((i * 64) % 4080)) $((i % 255 + 1)) $(((i * 7919) % db_pages)) >>"$cmds"
done
# 10 %: a package upgrade: replace shared libraries with changed copies.
left=$(($(share 0.10) * 1024))
while read -r f && [ "$left" -gt 0 ]; do
	rel=${f#"$rootfs"}
	sz=$(stat -c %s "$f")
	base=$(basename "$f")
	{ head -c $((sz / 2)) "$f"; printf 'UPGRADED'; tail -c +$((sz / 2 + 9)) "$f"; } >"$work/$base"
	printf 'rm %s\nwrite %s %s\n' "$rel" "$work/$base" "$rel" >>"$cmds"
	left=$((left - sz))
done < <(find "$rootfs/usr/lib" -type f -name '*.so*' -size +64k -size -4M | sort)
printf 'dpkg status of the next day\n' >>"$work/status"
cat "$rootfs/var/lib/dpkg/status" >>"$work/status"
printf 'rm /var/lib/dpkg/status\nwrite %s /var/lib/dpkg/status\n' "$work/status" >>"$cmds"

debugfs -w -f "$cmds" "$dir/next.raw" >"$dir/debugfs.out" 2>"$dir/debugfs.err"
if grep -v '^debugfs [0-9]' "$dir/debugfs.err" | grep -q .; then
	die "debugfs reported errors: $(grep -v '^debugfs [0-9]' "$dir/debugfs.err" | head -n 3)"
fi
e2fsck -fn "$dir/next.raw" >"$dir/fsck.log" 2>&1 || die "next-day image fails e2fsck, see $dir/fsck.log"
rm -rf "$work"

log "measuring (sha256, blocks changed)"
diff=$(cd "$repo_root" && go run ./bench/blockdiff "$dir/base.raw" "$dir/next.raw")
{
	echo "size=$size_bytes"
	echo "rootfs=$(basename "$rootfs")"
	echo "random_mib=$random_mib log_mib=$log_mib db_mib=$db_mib tar_usr=$tar_usr"
	echo "$diff" | tr ' ' '\n'
	echo "allocated_base=$(($(stat -c %b "$dir/base.raw") * 512))"
	echo "sha256_base=$(sha256sum "$dir/base.raw" | cut -d' ' -f1)"
	echo "sha256_next=$(sha256sum "$dir/next.raw" | cut -d' ' -f1)"
} >"$dir/info.tmp"
mv "$dir/info.tmp" "$dir/info"
log "done: $diff"
echo "$dir"
