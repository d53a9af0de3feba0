package config

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
)

func FuzzParse(f *testing.F) {
	example, err := os.ReadFile("../docs/vmvault.example.toml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(string(example))
	f.Add(header + "[vm.a]\ndisk.hda = { lv = \"vg/a\", snapshot_size = \"1.5G\" }\n")
	f.Add(header + "[vm.a]\ndisk.x = { path = \"/dev/sdb\" }\nguest = { ssh = \"root@[::1]:22\", key = \"/k\" }\n")
	f.Add("[repository]\nurl = \"sftp://u@h:22/x\"\npassword_file = \"/p\"\nssh_key = \"/k\"\n[retention]\nkeep_within = \"1y2m\"\n")
	f.Fuzz(func(t *testing.T, text string) {
		cfg, err := Parse("fuzz.toml", []byte(text), Options{SkipFileChecks: true})
		if err != nil {
			if cfg != nil {
				t.Fatal("config returned with an error")
			}
			errs := []error{err}
			if j, ok := err.(interface{ Unwrap() []error }); ok {
				errs = j.Unwrap()
			}
			for _, e := range errs {
				var ce *Error
				if !errors.As(e, &ce) || ce.File != "fuzz.toml" {
					t.Fatalf("error %q is not a config.Error naming the file", e)
				}
			}
			return
		}
		if cfg.Repository.URL == "" || cfg.Repository.PasswordFile == "" {
			t.Fatalf("accepted without url or password_file: %+v", cfg.Repository)
		}
		if err := cfg.Retention.Validate(); err != nil {
			t.Fatalf("accepted an invalid policy: %v", err)
		}
		for name, vm := range cfg.VMs {
			if vm.Name != name || len(vm.Disks) == 0 {
				t.Fatalf("vm %q: %+v", name, vm)
			}
			if !slices.IsSortedFunc(vm.Disks, func(a, b Disk) int { return strings.Compare(a.Name, b.Name) }) {
				t.Fatalf("vm %q: disks not sorted", name)
			}
			for _, d := range vm.Disks {
				if d.LV.IsZero() == (d.Path == "") || (d.SnapshotSize > 0) != !d.LV.IsZero() || (d.File != "" && d.LV.IsZero()) {
					t.Fatalf("vm %q: inconsistent disk %+v", name, d)
				}
			}
			if g := vm.Guest; g != nil && (g.User == "" || g.Host == "" || g.Port < 1 || g.Port > 65535 || g.Key == "") {
				t.Fatalf("vm %q: incomplete guest %+v", name, g)
			}
		}
	})
}
