package snapshot

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Thin LVM: a thin snapshot costs almost nothing in its pool, so the
// snapshot a backup read is kept as the base of the next backup, and the
// pool's metadata says which blocks differ between the base and the new
// snapshot (thin_delta). The rules this file keeps:
//
//   - Only volumes vmvault made are ever touched: every snapshot and base
//     carries the tags "vmvault" and "vmvault-vm=<vm>", and a base is
//     trusted only if its thin id and LV uuid are the ones recorded when it
//     was read (ThinBase), so a volume put in its place is never taken for
//     it.
//   - The pool's metadata snapshot, reserved for thin_delta, is always
//     released, also after an error or a cancellation (on a context that
//     is not cancelled).
//   - thin_delta's output is parsed strictly: anything unexpected is an
//     error, on which the caller reads the disk whole.

// baseSuffix ends the name of the snapshot kept as a disk's base:
// "<vm>-<disk>-vmvault-base". It does not end in snapshotSuffix, so
// FindLeftovers never takes a base for a leftover.
const baseSuffix = snapshotSuffix + "-base"

// BaseName returns the name of the snapshot kept as the base of one disk
// of a VM.
func BaseName(vm, disk string) string { return vm + "-" + disk + baseSuffix }

// Volume is what lvs says about one logical volume.
type Volume struct {
	LV LV
	// SegType is the segment type: "thin", "linear", "thin-pool", …
	SegType string
	// Pool is the thin pool of a thin volume (pool_lv), in the same VG.
	Pool string
	// ThinID is the volume's device id in its pool (thin_id); 0 if not thin.
	ThinID int64
	// UUID is the LV uuid.
	UUID string
	// Origin is the origin of a snapshot, empty otherwise.
	Origin string
	// Tags are the LV's tags.
	Tags []string
	// Attr is lv_attr, e.g. "Vwi-a-tz-k".
	Attr string
	// Size is the volume's size in bytes.
	Size int64
}

// Thin reports whether the volume is a thin volume (one whose changes a
// pool can tell).
func (v Volume) Thin() bool { return v.SegType == "thin" && v.Pool != "" && v.ThinID > 0 }

// PoolLV returns the volume's thin pool.
func (v Volume) PoolLV() LV { return LV{VG: v.LV.VG, Name: v.Pool} }

// OwnedBy reports whether vmvault made the volume for vm: it carries
// both the tag "vmvault" and "vmvault-vm=<vm>".
func (v Volume) OwnedBy(vm string) bool {
	var mark, owner bool
	for _, t := range v.Tags {
		mark = mark || t == "vmvault"
		owner = owner || t == vmTagPrefix+vm
	}
	return mark && owner
}

// lvsVolumeFields are the lvs columns parseVolume reads, in order.
const lvsVolumeFields = "lv_name,vg_name,segtype,pool_lv,thin_id,lv_uuid,origin,lv_tags,lv_attr,lv_size"

// Inspect runs lvs for one volume. A volume that does not exist is an
// error wrapping ErrNotFound.
func Inspect(ctx context.Context, r Runner, lv LV) (Volume, error) {
	if err := checkLV(lv); err != nil {
		return Volume{}, err
	}
	out, err := r.Run(ctx, "lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
		"-o", lvsVolumeFields, lv.String())
	if err != nil {
		if notFound(err) {
			return Volume{}, fmt.Errorf("inspect %s: %w: %w", lv, ErrNotFound, err)
		}
		return Volume{}, fmt.Errorf("inspect %s: %w", lv, err)
	}
	v, err := parseVolume(string(out))
	if err != nil {
		return Volume{}, fmt.Errorf("inspect %s: %w", lv, err)
	}
	if v.LV != lv {
		return Volume{}, fmt.Errorf("inspect %s: lvs answered for %s", lv, v.LV)
	}
	return v, nil
}

func checkLV(lv LV) error {
	if err := CheckName("volume group", lv.VG); err != nil {
		return err
	}
	return CheckName("logical volume", lv.Name)
}

// parseVolume reads the one line of lvs output with lvsVolumeFields.
func parseVolume(out string) (Volume, error) {
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) != 1 {
		return Volume{}, fmt.Errorf("lvs printed %d lines, want 1: %q", len(lines), out)
	}
	f := strings.Split(lines[0], "|")
	if len(f) != 10 {
		return Volume{}, fmt.Errorf("unexpected lvs output %q", lines[0])
	}
	for i := range f {
		f[i] = strings.TrimSpace(f[i])
	}
	v := Volume{LV: LV{VG: f[1], Name: f[0]}, SegType: f[2], Pool: f[3], UUID: f[5], Origin: f[6], Attr: f[8]}
	if f[7] != "" {
		v.Tags = strings.Split(f[7], ",")
	}
	if f[4] != "" {
		id, err := strconv.ParseInt(f[4], 10, 64)
		if err != nil || id < 0 {
			return Volume{}, fmt.Errorf("unexpected thin_id %q in lvs output %q", f[4], lines[0])
		}
		v.ThinID = id
	}
	size, err := strconv.ParseInt(f[9], 10, 64)
	if err != nil || size < 0 {
		return Volume{}, fmt.Errorf("unexpected lv_size %q in lvs output %q", f[9], lines[0])
	}
	v.Size = size
	if checkLV(v.LV) != nil || len(v.Attr) < 5 {
		return Volume{}, fmt.Errorf("unexpected lvs output %q", lines[0])
	}
	return v, nil
}

// CreateThin makes a thin snapshot of the thin volume origin (lvcreate
// --type thin -n NAME, adding each tag with --addtag). Thin snapshots are
// created with LVM's activation-skip flag and stay inactive: ActivateThin
// makes the device.
func CreateThin(ctx context.Context, r Runner, origin LV, name string, tags ...string) (LV, error) {
	snap := LV{VG: origin.VG, Name: name}
	if err := CheckName("snapshot", name); err != nil {
		return LV{}, err
	}
	args := []string{"-y", "--type", "thin", "-n", name}
	for _, t := range tags {
		args = append(args, "--addtag", t)
	}
	args = append(args, origin.String())
	if _, err := r.Run(ctx, "lvcreate", args...); err != nil {
		return LV{}, fmt.Errorf("create thin snapshot %s of %s: %w", snap, origin, err)
	}
	return snap, nil
}

// ActivateThin activates a thin snapshot despite its activation-skip flag
// (lvchange -ay -K).
func ActivateThin(ctx context.Context, r Runner, lv LV) error {
	if _, err := r.Run(ctx, "lvchange", "-ay", "-K", lv.String()); err != nil {
		return fmt.Errorf("activate thin snapshot %s: %w", lv, err)
	}
	return nil
}

// Deactivate deactivates a volume (lvchange -an).
func Deactivate(ctx context.Context, r Runner, lv LV) error {
	if _, err := r.Run(ctx, "lvchange", "-an", lv.String()); err != nil {
		return fmt.Errorf("deactivate %s: %w", lv, err)
	}
	return nil
}

// Rename renames a volume within its volume group (lvrename); its thin id
// and uuid stay.
func Rename(ctx context.Context, r Runner, lv LV, name string) (LV, error) {
	to := LV{VG: lv.VG, Name: name}
	if err := checkLV(to); err != nil {
		return LV{}, err
	}
	if _, err := r.Run(ctx, "lvrename", lv.VG, lv.Name, name); err != nil {
		return LV{}, fmt.Errorf("rename %s to %s: %w", lv, name, err)
	}
	return to, nil
}

// ThinBase identifies a thin snapshot kept as a base: its name, pool, thin
// id and uuid. Its Note is recorded with the generation read from it, so
// the next backup can check that the volume of that name is still the
// same snapshot.
type ThinBase struct {
	LV     LV     `json:"-"`
	Pool   LV     `json:"-"`
	ThinID int64  `json:"thin_id"`
	UUID   string `json:"uuid"`
	// Name and PoolName are "vg/lv" on the wire.
	Name     string `json:"lv"`
	PoolName string `json:"pool"`
	// Kind is always "thin".
	Kind string `json:"kind"`
}

// Note encodes b as the tracker note recorded in the generation.
func (b ThinBase) Note() string {
	b.Kind, b.Name, b.PoolName = "thin", b.LV.String(), b.Pool.String()
	out, _ := json.Marshal(b) // cannot fail: strings and an integer
	return string(out)
}

// ParseThinBase decodes a tracker note written by ThinBase.Note; anything
// else (another tracker's note, unknown fields, bad names) is an error.
func ParseThinBase(note string) (ThinBase, error) {
	var b ThinBase
	dec := json.NewDecoder(strings.NewReader(note))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return ThinBase{}, fmt.Errorf("tracker note %q: %w", note, err)
	}
	if dec.More() {
		return ThinBase{}, fmt.Errorf("tracker note %q: trailing data", note)
	}
	if b.Kind != "thin" {
		return ThinBase{}, fmt.Errorf("tracker note %q: not a thin-LVM base", note)
	}
	var err error
	if b.LV, err = ParseLV(b.Name); err != nil {
		return ThinBase{}, fmt.Errorf("tracker note: %w", err)
	}
	if b.Pool, err = ParseLV(b.PoolName); err != nil {
		return ThinBase{}, fmt.Errorf("tracker note: %w", err)
	}
	if b.ThinID <= 0 || b.UUID == "" || b.Pool.VG != b.LV.VG {
		return ThinBase{}, fmt.Errorf("tracker note %q: incomplete", note)
	}
	return b, nil
}

// CheckBase verifies that the volume a note names is still the base it
// recorded: it exists, is a thin volume in the recorded pool with the
// recorded thin id and uuid, and carries vmvault's tags for vm. The error
// says why not; the caller then reads the disk whole.
func CheckBase(ctx context.Context, r Runner, vm string, b ThinBase) error {
	v, err := Inspect(ctx, r, b.LV)
	switch {
	case errors.Is(err, ErrNotFound):
		return fmt.Errorf("base %s is gone", b.LV)
	case err != nil:
		return err
	case !v.OwnedBy(vm):
		return fmt.Errorf("base %s does not carry vmvault's tags for VM %s", b.LV, vm)
	case !v.Thin() || v.PoolLV() != b.Pool:
		return fmt.Errorf("base %s is not a thin volume of pool %s", b.LV, b.Pool)
	case v.ThinID != b.ThinID || v.UUID != b.UUID:
		return fmt.Errorf("base %s is not the snapshot recorded (thin id %d uuid %s, recorded %d %s)", b.LV, v.ThinID, v.UUID, b.ThinID, b.UUID)
	}
	return nil
}

// FindBases lists the bases kept for vm in vg: volumes named
// "<vm>-<disk>-vmvault-base" that carry vmvault's tags for vm. The map
// goes from disk name to volume.
func FindBases(ctx context.Context, r Runner, vg, vm string) (map[string]LV, error) {
	if err := CheckName("volume group", vg); err != nil {
		return nil, err
	}
	out, err := r.Run(ctx, "lvs", "--noheadings", "--separator", "|", "-o", "lv_name,lv_tags", vg)
	if err != nil {
		return nil, fmt.Errorf("list volumes of %s: %w", vg, err)
	}
	return parseBases(string(out), vg, vm), nil
}

func parseBases(out, vg, vm string) map[string]LV {
	found := map[string]LV{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(strings.TrimSpace(line), "|")
		if len(f) != 2 {
			continue
		}
		name := strings.TrimSpace(f[0])
		disk, ok := strings.CutPrefix(name, vm+"-")
		if !ok {
			continue
		}
		if disk, ok = strings.CutSuffix(disk, baseSuffix); !ok || disk == "" {
			continue
		}
		v := Volume{Tags: strings.Split(strings.TrimSpace(f[1]), ",")}
		if v.OwnedBy(vm) {
			found[disk] = LV{VG: vg, Name: name}
		}
	}
	return found
}

// RemoveBase removes a kept base after checking that it is vm's.
func RemoveBase(ctx context.Context, r Runner, vm string, lv LV) error {
	v, err := Inspect(ctx, r, lv)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if !v.OwnedBy(vm) {
		return fmt.Errorf("%s does not carry vmvault's tags for VM %s: not removed", lv, vm)
	}
	return Remove(ctx, r, lv)
}

// Range is a byte range of a volume.
type Range struct{ Off, Len int64 }

// reserveWait bounds how long ThinDelta waits for a metadata snapshot
// another process holds (another VM's backup on the same pool holds it for
// about a second).
const reserveWait = 20 * time.Second

// ThinDelta returns the byte ranges in which thin volumes newID and baseID
// of pool differ, as the pool's metadata says: blocks mapped differently
// or in only one of them (one mapped only in the base was discarded and
// reads back as zeros). size is the volume size: ranges end there. It
// reserves the pool's metadata snapshot, runs thin_delta -m on it and
// always releases it.
func ThinDelta(ctx context.Context, r Runner, pool LV, baseID, newID, size int64) ([]Range, error) {
	if err := checkLV(pool); err != nil {
		return nil, err
	}
	dm := dmName(pool)
	if err := reserveMetadata(ctx, r, pool, dm, reserveWait); err != nil {
		return nil, err
	}
	out, err := r.Run(ctx, "thin_delta", "-m", "--snap1", strconv.FormatInt(baseID, 10),
		"--snap2", strconv.FormatInt(newID, 10), "/dev/mapper/"+dm+"_tmeta")
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if _, rerr := r.Run(rctx, "dmsetup", "message", dm+"-tpool", "0", "release_metadata_snap"); rerr != nil {
		err = errors.Join(err, fmt.Errorf("release the metadata snapshot of pool %s: %w", pool, rerr))
	}
	if err != nil {
		return nil, fmt.Errorf("thin_delta of pool %s: %w", pool, err)
	}
	ranges, err := ParseThinDelta(out, baseID, newID, size)
	if err != nil {
		return nil, fmt.Errorf("thin_delta of pool %s: %w", pool, err)
	}
	return ranges, nil
}

// reserveMetadata reserves the pool's metadata snapshot, waiting up to
// wait if another process holds it.
func reserveMetadata(ctx context.Context, r Runner, pool LV, dm string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		_, err := r.Run(ctx, "dmsetup", "message", dm+"-tpool", "0", "reserve_metadata_snap")
		if err == nil {
			return nil
		}
		var ce *CommandError
		busy := errors.As(err, &ce) && strings.Contains(ce.Stderr, "busy")
		if !busy {
			return fmt.Errorf("reserve the metadata snapshot of pool %s: %w", pool, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the metadata snapshot of pool %s stays reserved by another process "+
				"(if none runs, release it: dmsetup message %s-tpool 0 release_metadata_snap): %w", pool, dm, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// dmName is device-mapper's name of an LV: "vg-lv", each '-' inside the
// names doubled.
func dmName(lv LV) string {
	return strings.ReplaceAll(lv.VG, "-", "--") + "-" + strings.ReplaceAll(lv.Name, "-", "--")
}
