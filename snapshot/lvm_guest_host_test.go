package snapshot

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"vmvault/internal/lvmguest"
)

// guestTests are the in-guest tests (guest_lvm_test.go, build tag
// lvmguest) that TestLVMInGuest requires to run and pass. A guest test that
// is not listed here, or listed but not run, fails TestLVMInGuest.
var guestTests = []string{
	"TestGuestSnapshotConsistency",
	"TestGuestOverflow",
	"TestGuestLeftovers",
	"TestGuestFileLayoutExt4",
	"TestGuestFileLayoutXFS",
	"TestGuestThin",
}

var guestResultRE = regexp.MustCompile(`(?m)^--- (PASS|FAIL|SKIP): (TestGuest\w+) \(([0-9.]+)s\)`)

// TestLVMInGuest runs the snapshot package against real LVM: it builds this
// package's tests statically with the in-guest tests included, boots the
// Debian kernel under qemu with a scratch disk, runs them there, and checks
// that every one of them passed.
func TestLVMInGuest(t *testing.T) {
	if os.Getenv("VMVAULT_LVM_GUEST") == "1" {
		t.Skip("this is the host half; inside the guest the TestGuest* tests run")
	}
	if testing.Short() {
		t.Skip("boots a qemu guest and runs LVM in it (≈1–3 min); skipped with -short")
	}
	for _, tool := range []string{"qemu-system-x86_64", "lvm", "busybox", "mkfs.ext4", "mkfs.xfs", "pdata_tools"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err2 := os.Stat(filepath.Join("/usr/sbin", tool)); err2 != nil {
				t.Fatalf("%s not found: install qemu-system-x86 linux-image-amd64 busybox-static lvm2 e2fsprogs xfsprogs thin-provisioning-tools", tool)
			}
		}
	}
	// The guest gets 11 minutes (the in-guest tests 10) on a loaded
	// machine, but stays inside go test's -timeout, so a slow guest fails
	// with its console instead of a panic.
	budget := 11 * time.Minute
	if dl, ok := t.Deadline(); ok {
		budget = min(budget, time.Until(dl)-45*time.Second)
	}
	if budget < 2*time.Minute {
		t.Fatalf("only %v left before the test deadline; run with -timeout 15m", budget)
	}
	ctx, cancel := context.WithTimeout(context.Background(), budget+30*time.Second)
	defer cancel()
	work := t.TempDir()

	start := time.Now()
	bin := filepath.Join(work, "snapshot.test")
	build := exec.CommandContext(ctx, "go", "test", "-c", "-tags", "lvmguest", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the in-guest test binary: %v\n%s", err, out)
	}
	t.Logf("built %s in %v", filepath.Base(bin), time.Since(start).Round(time.Millisecond))

	script := fmt.Sprintf(`VMVAULT_LVM_GUEST=1 VMVAULT_LVM_GUEST_DISK=/dev/disk/by-serial/lvmtest \
	snapshot.test -test.v -test.count=1 -test.timeout=%ds -test.run '^TestGuest'
`, int((budget - time.Minute).Seconds()))
	res, err := lvmguest.Run(ctx, lvmguest.Spec{
		Script:    script,
		Binaries:  map[string]string{"/usr/local/bin/snapshot.test": bin},
		HostTools: []string{"mkfs.xfs", "pdata_tools"},
		Modules:   []string{"xfs", "dm-thin-pool"},
		Disks:     []lvmguest.Disk{{Serial: "lvmtest", SizeBytes: 512 << 20}},
		Timeout:   budget,
		WorkDir:   work,
		Console:   lvmguest.LineWriter(func(l string) { t.Log("guest: " + l) }),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest: boot to script %v, whole run %v (PVH kernel: %v)", res.Boot.Round(time.Millisecond), res.Elapsed.Round(time.Millisecond), res.PVH)

	ran := map[string]string{}
	for _, m := range guestResultRE.FindAllStringSubmatch(res.Output, -1) {
		ran[m[2]] = m[1]
		t.Logf("%s %s in %ss", m[1], m[2], m[3])
	}
	for _, name := range guestTests {
		if ran[name] != "PASS" {
			t.Errorf("in-guest test %s: %q, want PASS", name, ran[name])
		}
	}
	var extra []string
	for name := range ran {
		if !slices.Contains(guestTests, name) {
			extra = append(extra, name)
		}
	}
	sort.Strings(extra)
	if len(extra) > 0 {
		t.Errorf("in-guest tests not listed in guestTests: %s", strings.Join(extra, ", "))
	}
	if res.ExitCode != 0 {
		t.Errorf("in-guest test binary exited %d", res.ExitCode)
	}
	if t.Failed() {
		t.Logf("guest output:\n%s", res.Output)
	}
}
