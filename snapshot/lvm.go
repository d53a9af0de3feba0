package snapshot

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// LV names a logical volume as "vg/lv".
type LV struct {
	VG, Name string
}

// ParseLV parses "vg/lv", the form the configuration and LVM commands
// use; a /dev path is refused (it could name something that is not an
// LV).
func ParseLV(s string) (LV, error) {
	vg, name, ok := strings.Cut(s, "/")
	if !ok || CheckName("volume group", vg) != nil || CheckName("logical volume", name) != nil {
		return LV{}, fmt.Errorf("%q: want vg/lv, e.g. \"vg0/vm01-disk\" (not a /dev path)", s)
	}
	return LV{VG: vg, Name: name}, nil
}

// String returns "vg/lv", the form LVM commands take.
func (lv LV) String() string { return lv.VG + "/" + lv.Name }

// DevicePath returns the block device LVM creates for the volume.
func (lv LV) DevicePath() string { return "/dev/" + lv.VG + "/" + lv.Name }

// CheckName applies LVM's rule for volume group and logical volume names
// (letters, digits and +_.-, not starting with -, not . or .., at most 127
// characters). It is the one implementation of that rule: the
// configuration checks its vg/lv values and snapshot names with it when it
// loads, and this package checks again before every LVM command, so that
// no name can ever smuggle an option into a command line.
func CheckName(kind, s string) error {
	if s == "" || len(s) > maxName || s == "." || s == ".." || s[0] == '-' {
		return fmt.Errorf("invalid %s name %q", kind, s)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("+_.-", c)) {
			return fmt.Errorf("invalid %s name %q: only letters, digits and +_.- are allowed", kind, s)
		}
	}
	return nil
}

// maxName is LVM's limit on the length of a name.
const maxName = 127

// snapshotSuffix ends the name of every snapshot vmvault creates, so
// leftovers from a crashed run can be found.
const snapshotSuffix = "-vmvault"

// vmTagPrefix starts the LVM tag naming the VM a snapshot belongs to; it
// tells the leftovers of VM "web" from those of VM "web-db".
const vmTagPrefix = "vmvault-vm="

// SnapshotName returns the name of the snapshot of one disk of a VM:
// "<vm>-<disk>-vmvault".
func SnapshotName(vm, disk string) string { return vm + "-" + disk + snapshotSuffix }

// Create makes a snapshot of origin: lvcreate -s -L SIZE -n NAME vg/lv,
// adding each tag with --addtag.
func Create(ctx context.Context, r Runner, origin LV, name string, size int64, tags ...string) (LV, error) {
	snap := LV{VG: origin.VG, Name: name}
	if err := CheckName("snapshot", name); err != nil {
		return LV{}, err
	}
	if size <= 0 {
		return LV{}, fmt.Errorf("snapshot %s: size %d must be positive", snap, size)
	}
	args := []string{"-s", "-L", strconv.FormatInt(size, 10) + "b", "-n", name}
	for _, t := range tags {
		args = append(args, "--addtag", t)
	}
	args = append(args, origin.String())
	if _, err := r.Run(ctx, "lvcreate", args...); err != nil {
		return LV{}, fmt.Errorf("create snapshot %s of %s: %w", snap, origin, err)
	}
	return snap, nil
}

// ErrNotFound is returned (wrapped) when a logical volume does not exist.
var ErrNotFound = errors.New("logical volume not found")

// notFound reports whether an LVM command failed because the volume is gone.
func notFound(err error) bool {
	var ce *CommandError
	return errors.As(err, &ce) && (strings.Contains(ce.Stderr, "Failed to find logical volume") ||
		strings.Contains(ce.Stderr, "not found"))
}

// Remove deletes a snapshot with lvremove -f. Removing a volume that no
// longer exists succeeds, so cleanup can be retried.
func Remove(ctx context.Context, r Runner, lv LV) error {
	if _, err := r.Run(ctx, "lvremove", "-f", lv.String()); err != nil {
		if notFound(err) {
			return nil
		}
		return fmt.Errorf("remove snapshot %s: %w", lv, err)
	}
	return nil
}

// Status is a snapshot's state as lvs reports it.
type Status struct {
	// Attr is lv_attr, e.g. "swi-a-s---"; "swi-I-s---" is an overflowed
	// (invalid) snapshot.
	Attr string
	// Percent is how full the copy-on-write space is (snap_percent).
	Percent float64
	// Path is the block device (lv_path).
	Path string
	// Size is the copy-on-write space in bytes (lv_size), 0 if unknown.
	Size int64
}

// Invalid reports whether the snapshot overflowed: state "I" (invalid) or
// "S" (invalid while merging) in the fifth attribute character.
func (s Status) Invalid() bool {
	return len(s.Attr) >= 5 && (s.Attr[4] == 'I' || s.Attr[4] == 'S')
}

// IsSnapshot reports whether the volume is a (possibly merging) snapshot.
func (s Status) IsSnapshot() bool {
	return len(s.Attr) >= 1 && (s.Attr[0] == 's' || s.Attr[0] == 'S')
}

// ThinValid reports whether a thin volume is in order: a thin volume
// ('V'), not failed (health 'F' in the ninth attribute character).
func (s Status) ThinValid() bool {
	return len(s.Attr) >= 9 && s.Attr[0] == 'V' && s.Attr[8] != 'F'
}

// lvsStatusFields are the lvs columns parseStatus reads, in order.
const lvsStatusFields = "lv_attr,snap_percent,lv_path,lv_size"

// GetStatus runs lvs --noheadings --nosuffix -o lv_attr,snap_percent,lv_path,lv_size
// for one volume.
func GetStatus(ctx context.Context, r Runner, lv LV) (Status, error) {
	out, err := r.Run(ctx, "lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
		"-o", lvsStatusFields, lv.String())
	if err != nil {
		if notFound(err) {
			return Status{}, fmt.Errorf("status of %s: %w: %w", lv, ErrNotFound, err)
		}
		return Status{}, fmt.Errorf("status of %s: %w", lv, err)
	}
	st, err := parseStatus(string(out))
	if err != nil {
		return Status{}, fmt.Errorf("status of %s: %w", lv, err)
	}
	return st, nil
}

// parseStatus reads one line of lvs output with the lvsStatusFields columns,
// separated by "|" or, as lvs prints by default, by blanks. An inactive or
// invalid snapshot may have an empty percent.
func parseStatus(out string) (Status, error) {
	var line string
	for _, l := range strings.Split(out, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			line = l
			break
		}
	}
	if line == "" {
		return Status{}, errors.New("lvs printed nothing")
	}
	var f []string
	if strings.Contains(line, "|") {
		f = strings.Split(line, "|")
		for i := range f {
			f[i] = strings.TrimSpace(f[i])
		}
	} else {
		f = strings.Fields(line)
		// Blank-separated output loses an empty percent column; a path
		// in the second column means it was empty.
		if len(f) >= 2 && strings.HasPrefix(f[1], "/") {
			f = append([]string{f[0], ""}, f[1:]...)
		}
	}
	if len(f) < 3 {
		return Status{}, fmt.Errorf("unexpected lvs output %q", line)
	}
	st := Status{Attr: f[0], Path: f[2]}
	if len(st.Attr) < 5 {
		return Status{}, fmt.Errorf("unexpected lv_attr %q in lvs output %q", st.Attr, line)
	}
	if f[1] != "" {
		p, err := strconv.ParseFloat(strings.ReplaceAll(f[1], ",", "."), 64)
		if err != nil || p < 0 || p > 100 {
			return Status{}, fmt.Errorf("unexpected snap_percent %q in lvs output %q", f[1], line)
		}
		st.Percent = p
	}
	if st.Invalid() {
		st.Percent = 100
	}
	if len(f) >= 4 && f[3] != "" {
		size, err := strconv.ParseFloat(strings.ReplaceAll(f[3], ",", "."), 64)
		if err != nil || size < 0 {
			return Status{}, fmt.Errorf("unexpected lv_size %q in lvs output %q", f[3], line)
		}
		st.Size = int64(size)
	}
	return st, nil
}

// FindLeftovers lists the snapshots of vm that a crashed run left behind in
// vg: snapshots named "<vm>-<disk>-vmvault". A snapshot whose vmvault tag
// names another VM (vm "web" must not claim "web-db-disk0-vmvault") is not
// listed. The caller removes them, with a warning, before creating new ones.
func FindLeftovers(ctx context.Context, r Runner, vg, vm string) ([]LV, error) {
	if err := CheckName("volume group", vg); err != nil {
		return nil, err
	}
	out, err := r.Run(ctx, "lvs", "--noheadings", "--separator", "|", "-o", "lv_name,origin,lv_tags", vg)
	if err != nil {
		return nil, fmt.Errorf("list volumes of %s: %w", vg, err)
	}
	return parseLeftovers(string(out), vg, vm), nil
}

func parseLeftovers(out, vg, vm string) []LV {
	var found []LV
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(strings.TrimSpace(line), "|")
		if len(f) < 2 {
			continue
		}
		name, origin := strings.TrimSpace(f[0]), strings.TrimSpace(f[1])
		if origin == "" || !strings.HasPrefix(name, vm+"-") || !strings.HasSuffix(name, snapshotSuffix) ||
			len(name) <= len(vm)+1+len(snapshotSuffix) {
			continue
		}
		owner := ""
		if len(f) >= 3 {
			for _, tag := range strings.Split(f[2], ",") {
				if v, ok := strings.CutPrefix(strings.TrimSpace(tag), vmTagPrefix); ok {
					owner = v
				}
			}
		}
		if owner != "" && owner != vm {
			continue
		}
		found = append(found, LV{VG: vg, Name: name})
	}
	return found
}
