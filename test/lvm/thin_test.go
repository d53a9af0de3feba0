package lvm_test

import (
	"context"
	_ "embed"
	"os"
	"testing"
	"time"

	"vmvault/internal/lvmguest"
)

// thinScript runs the change-tracking scenarios inside the guest; see its
// header.
//
//go:embed thin.sh
var thinScript string

// thinConfig backs up one VM whose disk is a thin LV. snapshot_size is
// required by the configuration but unused: a thin snapshot shares the
// pool.
const thinConfig = `[repository]
url = "/tmp/repo"
password_file = "/etc/vmvault/password"
cache_dir = "/tmp/vmvault-cache"

[log]
level = "info"

[backup]
verify_unchanged = 1

[vm.vm11]
disk.hda = { lv = "vgt/vm11-hda", snapshot_size = "8M" }
`

// thinScenarios are the names thin.sh reports; each must PASS.
var thinScenarios = []string{"full", "incremental", "base-lost", "verify"}

// TestThinEndToEnd runs change tracking against a real thin pool in a
// qemu guest: the first backup reads the 512 MiB thin LV whole and keeps
// its thin snapshot as base; after 1 % of the LV is written at known
// offsets the pool reports exactly those ranges, the backup reads at most
// 3 % of the LV and restores byte-identical; a base removed by hand gives
// a full read with one log line saying so; a change hidden from the
// backup (thin_delta doctored) fails --verify-unchanged 100 loudly and
// commits nothing; after each run exactly one vmvault LV is left, the
// base.
func TestThinEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a qemu guest and runs five vmvault backups against thin LVM in it (≈1–2 min); skipped with -short")
	}
	requireTools(t)
	if _, err := os.Stat("/usr/sbin/pdata_tools"); err != nil {
		t.Fatal("thin_delta (/usr/sbin/pdata_tools) not found: install thin-provisioning-tools")
	}
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
	vmvaultBin := buildStatic(ctx, t, work, "vmvault/cmd/vmvault", "vmvault")
	blockseqBin := buildStatic(ctx, t, work, "vmvault/test/lvm/blockseq", "blockseq")

	res, err := lvmguest.Run(ctx, lvmguest.Spec{
		Script: scenarioLib + thinScript,
		Binaries: map[string]string{
			"/usr/local/bin/vmvault":  vmvaultBin,
			"/usr/local/bin/blockseq": blockseqBin,
		},
		Files:     map[string][]byte{"/etc/vmvault/vmvault.toml": []byte(thinConfig)},
		HostTools: []string{"pdata_tools"},
		Modules:   []string{"dm-thin-pool"},
		Disks:     []lvmguest.Disk{{Serial: "thin-pv", SizeBytes: 512 << 20}},
		Timeout:   budget,
		WorkDir:   work,
		Console:   lvmguest.LineWriter(func(l string) { t.Log("guest: " + l) }),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest: boot to script %v, whole run %v", res.Boot.Round(time.Millisecond), res.Elapsed.Round(time.Millisecond))
	checkScenarios(t, res, thinScenarios)
}
