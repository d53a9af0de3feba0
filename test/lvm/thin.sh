# The in-guest half of TestThinEndToEnd (thin_test.go): change tracking
# on a real thin LV, run by busybox sh inside the qemu guest of
# internal/lvmguest. For each scenario it prints one line
#   SCENARIO <name> PASS|FAIL <seconds>s <detail>
# which the host test requires to be PASS, and TIME lines for the steps.
# Needs /usr/local/bin/vmvault, /usr/local/bin/blockseq, thin_delta, the
# configuration at $CFG and a 512 MiB disk with serial thin-pv.
# The thin LV is 512 MiB (32 MiB of it written): around each cluster of
# changes the repository reads up to a few segments more (the keyed
# boundaries differ per repository, so this varies from run to run), and a
# smaller LV would make that overhead alone a percent or more.
set -u

CFG=/etc/vmvault/vmvault.toml
PW=/etc/vmvault/password
VG=vgt
LV=vm11-hda
DEV=/dev/$VG/$LV
MIB=1048576
SIZE=$((512 * MIB))
DATA=$((32 * MIB))
BASE=$LV-vmvault-base

TAG=thin
# now, since, say, timing, show, lastline, begin, fail, finish and
# setup_fail come from scenario.sh, which the host test puts in front.


# vmvault_lvs: every LV vmvault made (tag vmvault), "name:thin_id".
vmvault_lvs() { lvs --noheadings -o lv_name,thin_id @vmvault 2>/dev/null | awk '{ print $1 ":" $2 }' | sort | tr '\n' ' '; }
# one_base: exactly one LV of vmvault's is left, the base of hda.
one_base() {
	left=$(vmvault_lvs)
	case "$left" in
	"$BASE:"[0-9]*" ") ;;
	*) fail "want exactly the base $BASE, vmvault's LVs are: ${left:-none}" ;;
	esac
}
base_id() { lvs --noheadings -o thin_id "$VG/$BASE" 2>/dev/null | tr -d ' '; }
gens() { vmvault -c "$CFG" generations --json 2>/dev/null | grep -o '"vm":"vm11"' | wc -l; }
# backup NAME [ARGS…]: back up vm11 with --json; RC, READ (bytes_read)
# and the log in /tmp/NAME.err.
backup() {
	n=$1
	shift
	t=$(now)
	vmvault -c "$CFG" backup vm11 --json "$@" >"/tmp/$n.out" 2>"/tmp/$n.err"
	RC=$?
	timing "backup-$n" "$t"
	show "/tmp/$n.err"
	READ=$(grep -o '"bytes_read":[0-9]*' "/tmp/$n.out" | head -1 | cut -d: -f2)
	READ=${READ:-0}
}
# tracked LOG: the backup read only what changed; CHANGED is what the
# pool reported.
tracked() {
	line=$(grep 'reading only what changed' "$1")
	CHANGED=$(echo "$line" | grep -o 'changed_bytes=[0-9]*' | cut -d= -f2)
	RANGES=$(echo "$line" | grep -o 'ranges=[0-9]*' | cut -d= -f2)
	[ -n "$line" ] || fail "the backup did not use change tracking: $(grep 'change tracking' "$1" | cut -c1-200)"
	grep -q '"cbt":"thin"' "${1%.err}.out" || fail "--json does not say cbt thin: $(grep -o '"disk_stats":[^]]*' "${1%.err}.out")"
}
# whole LOG REASON: exactly one log line says the disk is read whole, for
# REASON.
whole() {
	n=$(grep -c 'reading the whole disk' "$1")
	[ "$n" = 1 ] || fail "want one line saying the disk is read whole, got $n"
	grep 'reading the whole disk' "$1" | grep -q "$2" || fail "the full read does not say \"$2\": $(grep 'reading the whole disk' "$1" | cut -c1-200)"
	grep -q '"cbt":"none"' "${1%.err}.out" || fail "--json does not say cbt none: $(grep -o '"disk_stats":[^]]*' "${1%.err}.out")"
}
# restored_ok: restore the newest generation onto the LV restored and
# compare it with the origin (unchanged since the backup).
restored_ok() {
	t=$(now)
	if ! vmvault -c "$CFG" restore vm11 latest --target "/dev/$VG/restored" >/dev/null 2>/tmp/restore.err; then
		show /tmp/restore.err
		fail "restore: $(lastline /tmp/restore.err)"
		return
	fi
	timing restore "$t"
	t=$(now)
	out=$(blockseq cmp "$DEV" "/dev/$VG/restored" "$SIZE" 2>&1)
	timing compare "$t"
	[ "$out" = equal ] || fail "the restored image is not the LV: $out"
}

# ---- setup: a thin pool, a 512 MiB thin LV with 32 MiB of data, a
# repository with 1 MiB segments on tmpfs
T0=$(now)
mkdir -p /etc/vmvault
printf 'thin-test-password\n' >"$PW"
chmod 600 "$PW"
PV=/dev/disk/by-serial/thin-pv
pvcreate -q -y "$PV" || setup_fail "pvcreate"
vgcreate -q "$VG" "$PV" || setup_fail "vgcreate"
lvcreate -q -y --type thin-pool -L 400m -n pool "$VG" || setup_fail "lvcreate thin-pool"
lvcreate -q -y -V 512m -T "$VG/pool" -n "$LV" || setup_fail "lvcreate $LV"
lvcreate -q -y -V 512m -T "$VG/pool" -n restored || setup_fail "lvcreate restored"
vmvault init --repo /tmp/repo --password-file "$PW" --kdf-params t=1,m=8192,p=1 --segment-size $MIB 2>/tmp/init.err ||
	{ show /tmp/init.err; setup_fail "vmvault init"; }
blockseq fill "$DEV" 0 "$DATA" 1 >/dev/null || setup_fail "fill $DEV"
timing setup "$T0"

# ---- day 1: no previous generation, a full read; the snapshot is kept
begin full
backup day1
[ "$RC" = 0 ] || fail "backup exited $RC: $(lastline /tmp/day1.err)"
whole /tmp/day1.err "no previous generation"
[ "$READ" -ge "$DATA" ] || fail "a full read read only $READ bytes"
one_base
ID1=$(base_id)
finish "bytes_read=$READ base-thin-id=$ID1"

# ---- day 2: 1 % of the LV written at known offsets, two ranges 0.5 MiB
# apart (writes cluster, as a file system's do); only those ranges are
# read (plus, around them, up to the next segment boundary the base has
# too), the restore equals the LV, the old base is gone. With
# --verify-unchanged 0, so the bound measures the tracking alone: the
# verify share (at least one random segment, up to 1.5 MiB here) comes on
# top, and is bounded on day 5.
begin incremental
W=$((2560 * 1024))
blockseq fill "$DEV" $((8 * MIB)) "$W" 2 >/dev/null && blockseq fill "$DEV" $((11 * MIB)) "$W" 3 >/dev/null || fail "write"
backup day2 --verify-unchanged 0
[ "$RC" = 0 ] || fail "backup exited $RC: $(lastline /tmp/day2.err)"
tracked /tmp/day2.err
# Both writes are whole 64 KiB pool blocks: the pool reports exactly them.
[ "${RANGES:-}" = 2 ] && [ "${CHANGED:-}" = $((2 * W)) ] || fail "the pool reported ranges=${RANGES:-?} changed_bytes=${CHANGED:-?}, want 2 and $((2 * W))"
LIMIT=$((SIZE * 3 / 100))
[ "$READ" -le "$LIMIT" ] || fail "read $READ bytes, more than 3 % of the LV ($LIMIT)"
[ "$READ" -ge $((2 * W)) ] || fail "read $READ bytes, less than the $((2 * W)) written"
restored_ok
one_base
ID2=$(base_id)
[ -n "$ID2" ] && [ "$ID2" != "$ID1" ] || fail "the base was not replaced (thin id $ID1, now ${ID2:-none})"
finish "bytes_read=$READ of $SIZE ($(awk -v r="$READ" -v s="$SIZE" 'BEGIN { printf "%.2f", 100 * r / s }') %) changed=$CHANGED"

# ---- the base removed by hand: a full read that says why, a new base
begin base-lost
lvremove -q -f "$VG/$BASE" >/dev/null || fail "lvremove the base"
blockseq fill "$DEV" $((20 * MIB)) 65536 4 >/dev/null
backup day3
[ "$RC" = 0 ] || fail "backup exited $RC: $(lastline /tmp/day3.err)"
whole /tmp/day3.err "is gone"
[ "$READ" -ge "$DATA" ] || fail "a full read read only $READ bytes"
one_base
finish "bytes_read=$READ"

# ---- a change the pool does not report (thin_delta doctored to drop
# every changed block): --verify-unchanged 100 must fail loudly and
# commit nothing, the old base stays; then a normal backup catches up
# against that base (its restore is not compared again: day 2 did, and
# comparing 256 MiB twice costs half a minute under TCG)
begin verify
ID3=$(base_id)
n0=$(gens)
mkdir -p /usr/local/sbin
printf '#!/bin/sh\n/usr/sbin/thin_delta "$@" | grep -v -e "<different" -e "<right_only" -e "<left_only"\n' >/usr/local/sbin/thin_delta
chmod 755 /usr/local/sbin/thin_delta
blockseq fill "$DEV" $((24 * MIB)) 65536 5 >/dev/null
backup day4 --verify-unchanged 100
rm -f /usr/local/sbin/thin_delta
if [ "$RC" = 0 ]; then
	fail "the backup succeeded although a change was hidden from it"
else
	grep -q 'missed a change' /tmp/day4.err || fail "exit $RC but no word of a missed change: $(lastline /tmp/day4.err)"
fi
[ "$(gens)" = "$n0" ] || fail "a generation was committed ($n0 before, $(gens) after)"
[ "$(base_id)" = "$ID3" ] || fail "the base changed after a failed backup ($ID3, now $(base_id))"
one_base
backup day5
[ "$RC" = 0 ] || fail "backup after the failure exited $RC: $(lastline /tmp/day5.err)"
tracked /tmp/day5.err
# One 64 KiB block changed, plus the default 1 % verify share.
[ "$READ" -le "$LIMIT" ] || fail "read $READ bytes for one changed block, more than 3 % of the LV ($LIMIT)"
one_base
finish "exit=$RC bytes_read=$READ"

timing total "$T0"
[ "$ALL_OK" = 1 ]
