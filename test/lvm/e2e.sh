# The in-guest half of TestBackupEndToEnd (e2e_test.go): `vmvault backup`
# from a configuration file against real LVM, run by busybox sh inside the
# qemu guest of internal/lvmguest. For each scenario it prints one line
#   SCENARIO <name> PASS|FAIL <seconds>s <detail>
# which the host test requires to be PASS, and TIME lines for the steps.
# Needs /usr/local/bin/vmvault, /usr/local/bin/blockseq, the configuration
# at $CFG and a 256 MiB disk with serial e2e-pv.
set -u

CFG=/etc/vmvault/vmvault.toml
PW=/etc/vmvault/password
VG=vg0
MIB=1048576
# vm01's disk is the LV: a static region of known content, then NBLK
# numbered 4 KiB blocks that blockseq keeps rewriting during the backups.
VM01_SIZE=$((48 * MIB))
STATIC=$((16 * MIB))
NBLK=8192
WSTATUS=/tmp/writer.count
# Set by the steps below; empty until then (set -u).
rc=""
K=""
sha_snap=""
sha_new=""

TAG=e2e
# now, since, say, timing, show, lastline, begin, fail, finish and
# setup_fail come from scenario.sh, which the host test puts in front.


# wait_for SECONDS COMMAND…: poll every 50 ms until COMMAND succeeds.
wait_for() {
	end=$(awk -v n="$1" '{ printf "%d", $1 + n }' /proc/uptime)
	shift
	until "$@"; do
		[ "$(cut -d. -f1 /proc/uptime)" -ge "$end" ] && return 1
		sleep 0.05
	done
	return 0
}
# snap_exists VM-DISK: the snapshot is in place. Not the /dev/VG/LV link:
# lvcreate -s first activates the new LV as a plain volume to zero its
# header, so the link exists a second or more before the snapshot is
# taken. The device-mapper table says "snapshot" only once it is live.
dmname() { echo "$VG-$(echo "$1" | sed 's/-/--/g')"; }
snap_exists() { dmsetup table "$(dmname "$1-vmvault")" 2>/dev/null | grep -q ' snapshot '; }
# reading PID: vmvault holds a device-mapper device open; it opens no dm
# device other than the snapshot, so the backup has begun reading it.
reading() { ls -l "/proc/$1/fd" 2>/dev/null | grep -qE ' -> /dev/(dm-[0-9]+|mapper/.*--vmvault)$'; }
count() { cat "$WSTATUS" 2>/dev/null || echo 0; }
writer_at_least() { [ "$(count)" -ge "$1" ]; }
snapshots_left() { lvs --noheadings -o lv_name "$VG" 2>&1 | tr -d ' ' | grep -- '-vmvault' | tr '\n' ' '; }
no_snapshots_left() {
	left=$(snapshots_left)
	[ -z "$left" ] || fail "snapshot LVs left behind: $left"
	dm=$(dmsetup ls 2>/dev/null | grep -- '--vmvault' | cut -f1 | tr '\n' ' ')
	[ -z "$dm" ] || fail "device-mapper devices left behind: $dm"
	if grep -q vmvault-snap /proc/mounts; then
		fail "a snapshot is still mounted: $(grep vmvault-snap /proc/mounts | tr '\n' ' ')"
	fi
}
# gens VM: how many generations the repository holds for VM. All VMs are
# listed: asked for one VM that has none, vmvault exits 1 by design.
gens() {
	if out=$(vmvault -c "$CFG" generations --json 2>/tmp/gens.err); then
		echo "$out" | grep -o "\"vm\":\"$1\"" | wc -l
	else
		echo "error($(lastline /tmp/gens.err))"
	fi
}
# backup_bg VM LOG: start `vmvault backup VM` in the background; BPID is
# its PID, stdout and stderr go to LOG.out and LOG.err.
backup_bg() {
	vmvault -c "$CFG" backup "$1" >"$2.out" 2>"$2.err" &
	BPID=$!
}
# verify_vm01: restore vm01's newest generation and check the static
# region and the numbered blocks; K is the number of writes in the image.
verify_vm01() {
	K=""
	t=$(now)
	if ! vmvault -c "$CFG" restore vm01 latest >/tmp/restore.raw 2>/tmp/restore.err; then
		show /tmp/restore.err
		fail "restore vm01: $(lastline /tmp/restore.err)"
		rm -f /tmp/restore.raw
		return
	fi
	timing restore-vm01 "$t"
	size=$(stat -c %s /tmp/restore.raw)
	[ "$size" = "$VM01_SIZE" ] || fail "restored vm01 image is $size bytes, want $VM01_SIZE"
	sum=$(blockseq sum /tmp/restore.raw 0 "$STATIC" 2>&1)
	[ "$sum" = "$STATIC_SHA" ] || fail "restored static region: sha256 $sum, want $STATIC_SHA"
	if out=$(blockseq verify /tmp/restore.raw "$STATIC" "$NBLK" 2>&1); then
		K=${out#writes }
		say "restored vm01 is the state after $K numbered writes"
	else
		fail "restored numbered region: $out"
	fi
	rm -f /tmp/restore.raw
}

# ---- setup: a VG on the virtual disk, three LVs, a repository on tmpfs
T0=$(now)
mkdir -p /etc/vmvault
printf 'e2e-test-password\n' >"$PW"
chmod 600 "$PW"
PV=/dev/disk/by-serial/e2e-pv
pvcreate -q -y "$PV" || setup_fail "pvcreate $PV"
vgcreate -q "$VG" "$PV" || setup_fail "vgcreate"
lvcreate -q -y -L 48m -n vm01-hda "$VG" || setup_fail "lvcreate vm01-hda"
lvcreate -q -y -L 40m -n vm02-data "$VG" || setup_fail "lvcreate vm02-data"
lvcreate -q -y -L 32m -n vm03-hda "$VG" || setup_fail "lvcreate vm03-hda"
vmvault init --repo /tmp/repo --password-file "$PW" --kdf-params t=1,m=8192,p=1 2>/tmp/init.err ||
	{ show /tmp/init.err; setup_fail "vmvault init"; }
vmvault -c "$CFG" config check 2>/tmp/cc.err || { show /tmp/cc.err; setup_fail "vmvault config check"; }
STATIC_SHA=$(blockseq fill "/dev/$VG/vm01-hda" 0 "$STATIC" 1) || setup_fail "fill vm01 static region"
blockseq zero "/dev/$VG/vm01-hda" "$STATIC" $((NBLK * 4096)) || setup_fail "zero vm01 numbered region"
# The writer runs through scenarios 1, 4 and 5 (stopped in between).
blockseq write "/dev/$VG/vm01-hda" "$STATIC" "$NBLK" "$WSTATUS" >/tmp/writer.out 2>&1 &
WPID=$!
wait_for 60 writer_at_least 100 || setup_fail "the writer did not start: $(cat /tmp/writer.out)"
timing setup "$T0"

# ---- 1. the LV is the disk; the writer writes throughout the backup
begin lv-disk
c0=$(count)
t=$(now)
backup_bg vm01 /tmp/s1
csnap=""
if wait_for 120 snap_exists vm01-hda; then
	csnap=$(count)
else
	fail "snapshot vm01-hda-vmvault never appeared"
fi
wait "$BPID"
rc=$?
cend=$(count)
timing backup-vm01 "$t"
show /tmp/s1.err
[ "$rc" -eq 0 ] || fail "backup vm01 exited $rc: $(lastline /tmp/s1.err)"
no_snapshots_left
n=$(gens vm01)
[ "$n" = 1 ] || fail "vm01 has $n generations, want 1"
verify_vm01
if [ -n "$K" ] && [ -n "$csnap" ]; then
	say "writes: $c0 before the backup, $csnap once the snapshot existed, $K in the image, $cend after the backup"
	[ "$K" -ge "$c0" ] || fail "the image has $K numbered writes, fewer than the $c0 done before the backup started"
	[ "$K" -le $((csnap + 1)) ] || fail "the image has $K numbered writes, more than the $csnap done when the snapshot existed: not the snapshot's content"
	[ "$cend" -ge $((K + 20)) ] || fail "only $((cend - K)) writes after the snapshot: the writer did not keep writing during the backup"
fi
kill -0 "$WPID" 2>/dev/null || fail "the writer died: $(cat /tmp/writer.out)"
finish "writes-before=$c0 at-snapshot=$csnap in-image=$K after=$cend"
kill -STOP "$WPID"

# ---- 2. the disk is an image file on ext4 on the LV
begin image-file
F=/mnt/vm02/images/vm02.raw
if mkfs.ext4 -q -F "/dev/$VG/vm02-data" && mkdir -p /mnt/vm02 && mount -t ext4 "/dev/$VG/vm02-data" /mnt/vm02 && mkdir -p /mnt/vm02/images; then
	sha_snap=$(blockseq fill "$F" 0 $((16 * MIB)) 2)
	sync
	t=$(now)
	backup_bg vm02 /tmp/s2
	sha_new=""
	# Change the file once the snapshot exists: the backup must not see it.
	if wait_for 120 snap_exists vm02-data; then
		blockseq fill "$F" 0 $((4 * MIB)) 3 >/dev/null && sync
		sha_new=$(sha256sum "$F" | cut -d' ' -f1)
	else
		fail "snapshot vm02-data-vmvault never appeared"
	fi
	wait "$BPID"
	rc=$?
	timing backup-vm02 "$t"
	show /tmp/s2.err
	[ "$rc" -eq 0 ] || fail "backup vm02 exited $rc: $(lastline /tmp/s2.err)"
	no_snapshots_left
	left=$(ls -d /tmp/vmvault-snap-* 2>/dev/null | tr '\n' ' ')
	[ -z "$left" ] || fail "mount points left behind: $left"
	t=$(now)
	if vmvault -c "$CFG" restore vm02 latest >/tmp/r2.raw 2>/tmp/r2.err; then
		timing restore-vm02 "$t"
		got=$(sha256sum /tmp/r2.raw | cut -d' ' -f1)
		[ "$got" = "$sha_snap" ] || fail "restored vm02.raw sha256 $got, want $sha_snap (the file at snapshot time; after it: $sha_new)"
		[ "$sha_new" != "$sha_snap" ] || fail "the file did not change after the snapshot (test error)"
	else
		show /tmp/r2.err
		fail "restore vm02: $(lastline /tmp/r2.err)"
	fi
	rm -f /tmp/r2.raw
	umount /mnt/vm02
else
	fail "could not make ext4 on /dev/$VG/vm02-data"
fi
finish "sha256=$sha_snap"

# ---- 3. overflow: a 4 MiB snapshot and 16 MiB written to the origin
# The writes are O_DIRECT and start as soon as vmvault reads the
# snapshot, so the snapshot overflows within a second, while the backup is
# still reading: from then on its reads fail with EIO (the usual way a
# nightly backup meets an overflow). vmvault must still say that the
# snapshot overflowed and to raise snapshot_size.
begin overflow
blockseq fill "/dev/$VG/vm03-hda" 0 $((32 * MIB)) 4 >/dev/null || fail "fill vm03-hda"
t=$(now)
backup_bg vm03 /tmp/s3
attr=""
if wait_for 120 snap_exists vm03-hda && wait_for 60 reading "$BPID"; then
	dd if=/dev/zero of="/dev/$VG/vm03-hda" bs=1M count=16 oflag=direct conv=fsync 2>/dev/null ||
		fail "write to the origin vm03-hda"
	attr=$(lvs --noheadings -o lv_attr,snap_percent "$VG/vm03-hda-vmvault" 2>/dev/null | tr -s ' ')
	say "snapshot $(since "$t")s after the backup started, with 16 MiB written to its origin: ${attr:-gone}"
else
	fail "vmvault never began reading snapshot vm03-hda-vmvault"
fi
wait "$BPID"
rc=$?
timing backup-vm03 "$t"
show /tmp/s3.err
if [ "$rc" -eq 0 ]; then
	fail "backup vm03 succeeded although its snapshot overflowed (lv_attr then: ${attr:-gone})"
elif ! grep -q overflowed /tmp/s3.err || ! grep -q snapshot_size /tmp/s3.err; then
	fail "backup vm03 failed (exit $rc) but does not say that the snapshot overflowed and to raise snapshot_size; the read error of an overflowed snapshot must be reported as an overflow (lv_attr: ${attr:-gone}): $(lastline /tmp/s3.err)"
fi
no_snapshots_left
n=$(gens vm03)
[ "$n" = 0 ] || fail "vm03 has $n generations after the overflow, want 0"
finish "exit=$rc"

# ---- 4. SIGTERM while the backup reads the snapshot; then a rerun
begin sigterm
kill -CONT "$WPID"
n0=$(gens vm01)
t=$(now)
backup_bg vm01 /tmp/s4
sent=""
if wait_for 120 snap_exists vm01-hda && wait_for 60 reading "$BPID"; then
	sleep 1
	if kill -0 "$BPID" 2>/dev/null; then
		kill -TERM "$BPID"
		sent=$(now)
	fi
else
	fail "vmvault never began reading snapshot vm01-hda-vmvault"
fi
wait "$BPID"
rc=$?
[ -n "$sent" ] && say "vmvault exited $(since "$sent")s after SIGTERM"
timing backup-vm01-interrupted "$t"
show /tmp/s4.err
if [ -z "$sent" ]; then
	fail "the backup ended (exit $rc) before SIGTERM could be sent"
else
	[ "$rc" -eq 130 ] || fail "exit code $rc after SIGTERM, want 130: $(lastline /tmp/s4.err)"
	grep -q interrupted /tmp/s4.err || fail "no 'interrupted' message: $(lastline /tmp/s4.err)"
fi
no_snapshots_left
n=$(gens vm01)
[ "$n" = "$n0" ] || fail "vm01 has $n generations after the interrupted backup, want $n0"
t=$(now)
vmvault -c "$CFG" backup vm01 >/tmp/s4b.out 2>/tmp/s4b.err
rc=$?
timing backup-vm01-rerun "$t"
show /tmp/s4b.err
[ "$rc" -eq 0 ] || fail "rerun after SIGTERM exited $rc: $(lastline /tmp/s4b.err)"
no_snapshots_left
n=$(gens vm01)
[ "$n" = $((n0 + 1)) ] || fail "vm01 has $n generations after the rerun, want $((n0 + 1))"
verify_vm01
finish "exit=130 rerun-writes-in-image=$K"

# ---- 5. a snapshot left by a crashed run is removed, then the backup runs
begin leftover
if lvcreate -q -y -s -L 8m -n vm01-hda-vmvault "$VG/vm01-hda"; then
	n0=$(gens vm01)
	t=$(now)
	vmvault -c "$CFG" backup vm01 >/tmp/s5.out 2>/tmp/s5.err
	rc=$?
	timing backup-vm01-leftover "$t"
	show /tmp/s5.err
	[ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || fail "backup with a leftover snapshot exited $rc: $(lastline /tmp/s5.err)"
	grep -i leftover /tmp/s5.err | grep -q vm01-hda-vmvault || fail "no warning naming the leftover snapshot vm01-hda-vmvault"
	no_snapshots_left
	n=$(gens vm01)
	[ "$n" = $((n0 + 1)) ] || fail "vm01 has $n generations, want $((n0 + 1))"
	verify_vm01
else
	fail "could not create the leftover snapshot by hand"
fi
finish "exit=$rc writes-in-image=$K"
kill -TERM "$WPID"
wait "$WPID"
say "writer: $(cat /tmp/writer.out)"

# ---- 6. restore in place onto a block device: byte-identical, then only
# what differs is written; a target too small is refused
begin restore-target
if lvcreate -q -y -L 48m -n restored "$VG" && lvcreate -q -y -L 8m -n small "$VG"; then
	vmvault -c "$CFG" restore vm01 latest >/tmp/latest.raw 2>/tmp/rt0.err || fail "restore to a file: $(lastline /tmp/rt0.err)"
	size=$(stat -c %s /tmp/latest.raw)
	want=$(sha256sum </tmp/latest.raw | cut -d' ' -f1)
	ondev() { head -c "$size" "/dev/$VG/restored" | sha256sum | cut -d' ' -f1; }
	vmvault -c "$CFG" restore vm01 latest --target "/dev/$VG/restored" >/dev/null 2>/tmp/rt1.err || fail "restore --target: $(lastline /tmp/rt1.err)"
	[ "$(ondev)" = "$want" ] || fail "the LV does not hold the restored image"
	vmvault -c "$CFG" restore vm01 latest --target "/dev/$VG/restored" >/dev/null 2>/tmp/rt2.err || fail "second restore --target: $(lastline /tmp/rt2.err)"
	grep -q "written=0 " /tmp/rt2.err || fail "an identical target was written again: $(lastline /tmp/rt2.err)"
	dd if=/dev/urandom of="/dev/$VG/restored" bs=4096 count=1 seek=300 conv=notrunc,fsync 2>/dev/null
	vmvault -c "$CFG" restore vm01 latest --target "/dev/$VG/restored" >/dev/null 2>/tmp/rt3.err || fail "third restore --target: $(lastline /tmp/rt3.err)"
	grep -q "written=65536 " /tmp/rt3.err || fail "a 4 KiB difference did not rewrite exactly one 64 KiB block: $(lastline /tmp/rt3.err)"
	[ "$(ondev)" = "$want" ] || fail "the LV differs after the in-place repair"
	if vmvault -c "$CFG" restore vm01 latest --target "/dev/$VG/small" >/dev/null 2>/tmp/rt4.err; then
		fail "restore onto a too small device succeeded"
	else
		grep -q "needs" /tmp/rt4.err || fail "too small device: unclear error: $(lastline /tmp/rt4.err)"
	fi
	lvremove -q -y "$VG/restored" "$VG/small" >/dev/null
	rm -f /tmp/latest.raw
else
	fail "could not create the target LVs"
fi
finish "image=$size bytes"

# ---- the repository survived all of it
begin repo-check
t=$(now)
vmvault -c "$CFG" check --read-data >/tmp/check.out 2>/tmp/check.err
rc=$?
timing check "$t"
show /tmp/check.err
[ "$rc" -eq 0 ] || fail "vmvault check --read-data exited $rc: $(lastline /tmp/check.err)"
finish "generations: vm01=$(gens vm01) vm02=$(gens vm02) vm03=$(gens vm03)"

timing total "$T0"
[ "$ALL_OK" = 1 ]
