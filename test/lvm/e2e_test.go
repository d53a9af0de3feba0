package lvm_test

import (
	"context"
	_ "embed"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"vmvault/internal/lvmguest"
)

// guestScript runs the scenarios inside the guest; see its header.
//
//go:embed e2e.sh
var guestScript string

// scenarioLib is put in front of each in-guest script: the helpers that
// print SCENARIO, TIME and SETUP FAIL lines (checkScenarios reads them).
//
//go:embed scenario.sh
var scenarioLib string

// guestConfig is the vmvault configuration the guest backs up from: a
// repository on the guest's tmpfs and three VMs on the volume group the
// script makes.
const guestConfig = `[repository]
url = "/tmp/repo"
password_file = "/etc/vmvault/password"
cache_dir = "/tmp/vmvault-cache"

[log]
level = "info"

# The LV is the disk. The snapshot is as large as the LV: never overflows.
[vm.vm01]
disk.hda = { lv = "vg0/vm01-hda", snapshot_size = "48M" }

# An image file on ext4 on the LV.
[vm.vm02]
disk.data = { lv = "vg0/vm02-data", file = "images/vm02.raw", snapshot_size = "24M" }

# A snapshot too small for the writes the script makes during the backup.
[vm.vm03]
disk.hda = { lv = "vg0/vm03-hda", snapshot_size = "4M" }
`

// scenarios are the names the script reports; each must PASS.
var scenarios = []string{"lv-disk", "image-file", "overflow", "sigterm", "leftover", "restore-target", "repo-check"}

var (
	scenarioRE = regexp.MustCompile(`(?m)^SCENARIO (\S+) (PASS|FAIL) ([0-9.]+)s ?(.*)$`)
	timeRE     = regexp.MustCompile(`(?m)^TIME (\S+) ([0-9.]+)s$`)
	setupRE    = regexp.MustCompile(`(?m)^SETUP FAIL .*$`)
)

// TestBackupEndToEnd runs `vmvault backup` from a configuration file against
// real LVM in a qemu guest (the host kernel has no device-mapper): a VM whose
// disk is an LV written to during the backup (the restored image must be
// the LV at one instant), a VM whose disk is an image file on ext4 on an LV,
// a snapshot that overflows, a SIGTERM while reading, and a snapshot left by
// a crashed run. The scenarios themselves are in e2e.sh.
func TestBackupEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a qemu guest and runs five vmvault backups against LVM in it (≈2–4 min); skipped with -short")
	}
	requireTools(t)

	// Stay inside go test's -timeout (10 minutes by default), so a slow
	// guest fails with its console instead of a panic.
	budget := 12 * time.Minute
	if dl, ok := t.Deadline(); ok {
		budget = min(budget, time.Until(dl)-45*time.Second)
	}
	if budget < time.Minute {
		t.Fatalf("only %v left before the test deadline; run with -timeout 15m", budget)
	}
	ctx, cancel := context.WithTimeout(context.Background(), budget+30*time.Second)
	defer cancel()
	work := t.TempDir()

	start := time.Now()
	vmvaultBin := buildStatic(ctx, t, work, "vmvault/cmd/vmvault", "vmvault")
	blockseqBin := buildStatic(ctx, t, work, "vmvault/test/lvm/blockseq", "blockseq")
	t.Logf("built vmvault and blockseq in %v", time.Since(start).Round(time.Millisecond))

	res, err := lvmguest.Run(ctx, lvmguest.Spec{
		Script: scenarioLib + guestScript,
		Binaries: map[string]string{
			"/usr/local/bin/vmvault":  vmvaultBin,
			"/usr/local/bin/blockseq": blockseqBin,
		},
		Files:   map[string][]byte{"/etc/vmvault/vmvault.toml": []byte(guestConfig)},
		Disks:   []lvmguest.Disk{{Serial: "e2e-pv", SizeBytes: 256 << 20}},
		Timeout: budget,
		WorkDir: work,
		Console: lvmguest.LineWriter(func(l string) { t.Log("guest: " + l) }),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest: boot to script %v, whole run %v (PVH kernel: %v)", res.Boot.Round(time.Millisecond), res.Elapsed.Round(time.Millisecond), res.PVH)
	checkScenarios(t, res, scenarios)
}

// requireTools fails with an install hint when the guest cannot be built.
func requireTools(t *testing.T) {
	t.Helper()
	const hint = "install qemu-system-x86 linux-image-amd64 busybox-static lvm2 e2fsprogs"
	for _, tool := range []string{"qemu-system-x86_64", "lvm", "busybox", "mke2fs", "timeout"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err2 := os.Stat(filepath.Join("/usr/sbin", tool)); err2 != nil {
				t.Fatalf("%s not found: %s", tool, hint)
			}
		}
	}
	if k, _ := filepath.Glob("/boot/vmlinuz-*"); len(k) == 0 {
		t.Fatalf("no /boot/vmlinuz-* kernel for the guest: %s", hint)
	}
}

// buildStatic builds a static binary of pkg (no cgo, so it runs in the
// guest's initramfs without libraries).
func buildStatic(ctx context.Context, t *testing.T, dir, pkg, name string) string {
	t.Helper()
	out := filepath.Join(dir, name)
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, strings.TrimSpace(string(b)))
	}
	return out
}

// checkScenarios fails t for a SETUP FAIL line, for each scenario of
// want that is missing or not PASS, and for any scenario reported but not
// in want; it logs the TIME lines.
func checkScenarios(t *testing.T, res *lvmguest.Result, want []string) {
	t.Helper()
	for _, m := range timeRE.FindAllStringSubmatch(res.Output, -1) {
		t.Logf("time %-28s %6ss", m[1], m[2])
	}
	if m := setupRE.FindString(res.Output); m != "" {
		t.Fatalf("guest set-up failed: %s\nguest output:\n%s", m, res.Output)
	}
	got := map[string][]string{}
	for _, m := range scenarioRE.FindAllStringSubmatch(res.Output, -1) {
		got[m[1]] = m[2:]
		t.Logf("scenario %-11s %s in %ss: %s", m[1], m[2], m[3], m[4])
	}
	for _, name := range want {
		r, ok := got[name]
		switch {
		case !ok:
			t.Errorf("scenario %s: no result (the script stopped early?)", name)
		case r[0] != "PASS":
			t.Errorf("scenario %s: FAIL: %s", name, r[2])
		}
	}
	for name := range got {
		if !slices.Contains(want, name) {
			t.Errorf("scenario %s reported but not listed", name)
		}
	}
	if res.ExitCode != 0 && !t.Failed() {
		t.Errorf("guest script exited %d", res.ExitCode)
	}
}
