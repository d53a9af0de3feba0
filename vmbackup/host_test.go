package vmbackup

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vmvault/config"
	"vmvault/snapshot"
)

// FromConfig decides once what a configured VM needs: a snapshotter when
// a disk is an LV, a hold whenever there is a guest, a database or a
// snapshot, neither for a VM of plain files.
func TestFromConfig(t *testing.T) {
	lvDisk := config.Disk{Name: "hda", LV: config.LV{VG: "vg0", Name: "vm01"}, File: "img.raw", SnapshotSize: 1 << 30}
	pathDisk := config.Disk{Name: "hdb", Path: "/srv/vm01-hdb.raw"}
	tests := []struct {
		name       string
		vm         config.VM
		snap, hold bool
	}{
		{"lv", config.VM{Name: "a", Sudo: true, Disks: []config.Disk{lvDisk, pathDisk}}, true, true},
		{"plain path", config.VM{Name: "b", Disks: []config.Disk{pathDisk}}, false, false},
		{"path and guest", config.VM{Name: "c", Disks: []config.Disk{pathDisk}, Guest: &config.Guest{User: "root", Host: "10.0.0.5", Port: 22}}, false, true},
		{"path and database", config.VM{Name: "d", Disks: []config.Disk{pathDisk}, Databases: []config.Database{{Name: "main", DSN: "backup@tcp(127.0.0.1:3306)/"}}}, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vm, err := FromConfig(&tt.vm, nil)
			if err != nil {
				t.Fatal(err)
			}
			if (vm.Snapshotter != nil) != tt.snap || (vm.Quiescer != nil) != tt.hold {
				t.Fatalf("snapshotter %v, quiescer %v; want %v, %v", vm.Snapshotter, vm.Quiescer, tt.snap, tt.hold)
			}
			if vm.Name != tt.vm.Name || len(vm.Disks) != len(tt.vm.Disks) {
				t.Fatalf("plan %+v", vm)
			}
			for i, d := range vm.Disks {
				cd := tt.vm.Disks[i]
				if d.Name != cd.Name || (d.Volume != nil) != !cd.LV.IsZero() || (d.Source != nil) != cd.LV.IsZero() {
					t.Fatalf("disk %d: %+v from %+v", i, d, cd)
				}
				if d.Volume != nil && *d.Volume != (Volume{Origin: snapshot.LV{VG: "vg0", Name: "vm01"}, File: "img.raw", SnapshotSize: 1 << 30}) {
					t.Fatalf("volume %+v", *d.Volume)
				}
			}
			if tt.snap {
				if ex, ok := vm.Snapshotter.(LVM).Runner.(snapshot.Exec); !ok || !ex.Sudo {
					t.Fatalf("sudo lost: %+v", vm.Snapshotter)
				}
			}
		})
	}
}

// A database password file that others can read stops the plan, naming
// VM, database and file.
func TestFromConfigSecretFile(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "db.pw")
	os.WriteFile(pw, []byte("s3cret\n"), 0o644)
	vm := config.VM{Name: "a", Disks: []config.Disk{{Name: "hda", Path: "/x"}},
		Databases: []config.Database{{Name: "main", DSN: "backup@tcp(127.0.0.1:3306)/", PasswordFile: pw}}}
	_, err := FromConfig(&vm, nil)
	if err == nil || !strings.Contains(err.Error(), "VM a database main") || !strings.Contains(err.Error(), pw) || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("error %v", err)
	}
}
