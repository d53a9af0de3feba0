package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// dayImage is the disk image "as of" day d: a fixed base with one
// day-specific block, so every generation has data of its own.
func dayImage(d int) []byte {
	rng := rand.New(rand.NewPCG(99, 99))
	img := make([]byte, 3<<20)
	for i := range img {
		img[i] = byte(rng.Uint32())
	}
	day := rand.New(rand.NewPCG(uint64(d), 7))
	off := (d % 40) * 64 << 10
	for i := off; i < off+64<<10; i++ {
		img[i] = byte(day.Uint32())
	}
	return img
}

// backupAt backs up src as a generation of vm recorded at, and sets its
// manifest's file time to at: it "arrived" then, as a nightly backup
// would have (retention checks recorded times against arrival).
func backupAt(t *testing.T, e *env, vm, src string, at time.Time) string {
	t.Helper()
	r := e.ok("backup", vm, "--source", src, "--time", at.Format(time.RFC3339), "--json")
	var s backupSummary
	if err := json.Unmarshal([]byte(r.stdout), &s); err != nil || s.ID == "" {
		t.Fatalf("backup summary: %v %q", err, r.stdout)
	}
	if err := os.Chtimes(filepath.Join(e.repo, "manifests", s.ID), at, at); err != nil {
		t.Fatal(err)
	}
	return s.ID
}

func dirBytes(t *testing.T, dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

func TestPruneEndToEnd(t *testing.T) {
	e := newEnv(t)
	start := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	const days = 74 // 2026-01-01 … 2026-03-15 (a Sunday)
	src := filepath.Join(e.dir, "img")
	idByDay := map[string]string{}
	for d := range days {
		os.WriteFile(src, dayImage(d), 0o600)
		at := start.AddDate(0, 0, d)
		idByDay[at.Format("01-02")] = backupAt(t, e, "vm01", src, at)
	}
	before := dirBytes(t, filepath.Join(e.repo, "data"))

	// Dry run: prints decisions, removes nothing.
	r := e.ok("prune", "--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "6", "--dry-run")
	if !strings.Contains(r.stdout, "keep (daily 1") || !strings.Contains(r.stdout, "remove") || !strings.Contains(r.stderr, "would remove 62 generation") {
		t.Fatalf("dry run output: %s %s", r.stdout, r.stderr)
	}
	if dirBytes(t, filepath.Join(e.repo, "data")) != before {
		t.Fatal("dry run changed the repository")
	}

	e.ok("prune", "--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "6", "--safety-margin", "0")
	r = e.ok("snapshots", "--json")
	var gens []generationJSON
	json.Unmarshal([]byte(r.stdout), &gens)
	var kept []string
	for _, g := range gens {
		kept = append(kept, g.Time.UTC().Format("01-02"))
	}
	sort.Strings(kept)
	// daily 7: 03-09…03-15; weekly 4: weeks ending 03-15, 03-08, 03-01,
	// 02-22; monthly 6: 03-15, 02-28, 01-31.
	want := []string{"01-31", "02-22", "02-28", "03-01", "03-08", "03-09", "03-10", "03-11", "03-12", "03-13", "03-14", "03-15"}
	if strings.Join(kept, " ") != strings.Join(want, " ") {
		t.Fatalf("kept %v\nwant %v", kept, want)
	}
	after := dirBytes(t, filepath.Join(e.repo, "data"))
	if after >= before*3/4 {
		t.Fatalf("prune reclaimed too little: %d → %d bytes", before, after)
	}
	e.ok("check", "--read-data")
	for _, g := range gens {
		d := int(g.Time.Sub(start).Hours() / 24)
		out := e.ok("restore", "vm01", g.ID[:10]).stdout
		if sum([]byte(out)) != sum(dayImage(d)) {
			t.Fatalf("generation of %s restores wrong after prune", g.Time)
		}
	}
	// Reclaim-only prune of a clean repository removes nothing.
	r = e.ok("prune", "--json", "--safety-margin", "0")
	var res forgetResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Prune == nil || res.Prune.ObjectsRemoved != 0 {
		t.Fatalf("second prune: %v %s", err, r.stdout)
	}
	// The newest generation is protected.
	e.ok("forget", "vm01", "--keep-last", "0", "--keep-tag", "none")
	r = e.ok("snapshots", "--json")
	json.Unmarshal([]byte(r.stdout), &gens)
	if len(gens) != 1 || gens[0].ID != idByDay["03-15"] {
		t.Fatalf("after a keep-nothing forget: %+v", gens)
	}
}

func TestPruneLocking(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "img")
	os.WriteFile(src, dayImage(1), 0o600)
	e.ok("backup", "vm01", "--source", src)
	// A backup in progress (a child process reading a stdin we hold open)
	// makes prune refuse with the "locked" exit code, naming the holder.
	child := exec.Command(os.Args[0], "-test.run=^TestKilledBackupCommitsNothing$", "--", "--cache-dir", e.cache, "backup", "vm02", "--source", "-")
	child.Env = append(os.Environ(), "VMVAULT_HELPER_PROCESS=1", "VMVAULT_REPOSITORY="+e.repo, "VMVAULT_PASSWORD_FILE="+e.pw)
	stdin, _ := child.StdinPipe()
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	stdin.Write(dayImage(2)[:1<<20])
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if ents, _ := os.ReadDir(filepath.Join(e.repo, "locks")); len(ents) > 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	r := e.fails(exitLocked, "backup vm02", "prune")
	if !strings.Contains(r.stderr, fmt.Sprintf("PID %d", child.Process.Pid)) {
		t.Fatalf("lock message does not name the holder: %s", r.stderr)
	}
	// Killed holder: its lock is stale (same host, process gone).
	child.Process.Kill()
	child.Wait()
	e.ok("prune")
	e.ok("check")
}

// Prune killed at various instants leaves a repository that checks and
// restores; the next prune finishes.
func TestPruneKilled(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "img")
	for d := range 12 {
		os.WriteFile(src, dayImage(d), 0o600)
		backupAt(t, e, "vm01", src, time.Date(2026, 1, 1+d, 12, 0, 0, 0, time.UTC))
	}
	for _, delay := range []time.Duration{5 * time.Millisecond, 30 * time.Millisecond, 80 * time.Millisecond, 150 * time.Millisecond} {
		child := exec.Command(os.Args[0], "-test.run=^TestKilledBackupCommitsNothing$", "--", "--cache-dir", e.cache, "prune", "--keep-last", "2")
		child.Env = append(os.Environ(), "VMVAULT_HELPER_PROCESS=1", "VMVAULT_REPOSITORY="+e.repo, "VMVAULT_PASSWORD_FILE="+e.pw)
		var errb bytes.Buffer
		child.Stderr = &errb
		if err := child.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		child.Process.Kill()
		child.Wait()
		e.ok("check")
		r := e.ok("snapshots", "--json")
		var gens []generationJSON
		json.Unmarshal([]byte(r.stdout), &gens)
		if len(gens) < 2 {
			t.Fatalf("killed prune left %d generations", len(gens))
		}
		for _, g := range gens {
			d := g.Time.Day() - 1
			if out := e.ok("restore", "vm01", g.ID).stdout; sum([]byte(out)) != sum(dayImage(d)) {
				t.Fatalf("after prune killed at %v: generation %s restores wrong", delay, g.ShortID)
			}
		}
	}
	e.ok("prune", "--keep-last", "2")
	e.ok("check", "--read-data")
	r := e.ok("snapshots", "--json")
	var gens []generationJSON
	json.Unmarshal([]byte(r.stdout), &gens)
	if len(gens) != 2 {
		t.Fatalf("%d generations after the final prune", len(gens))
	}
}

// Without --keep-* flags, prune applies the configuration's policies:
// [vm.X] retention where set, else [retention].
func TestPrunePolicyFromConfig(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "img")
	cfg := filepath.Join(e.dir, "vmvault.toml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`
[repository]
url = %q
password_file = %q
cache_dir = %q

[retention]
keep_last = 2

[vm.a]
retention = { keep_last = 1 }
disk.hda = { path = %q }

[vm.b]
disk.hda = { path = %q }
`, e.repo, e.pw, e.cache, src, src)), 0o600)
	for d := range 3 {
		os.WriteFile(src, dayImage(d), 0o600)
		for _, vm := range []string{"a", "b"} {
			backupAt(t, e, vm, src, time.Date(2026, 2, 1+d, 12, 0, 0, 0, time.UTC))
		}
	}
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"--config", cfg, "prune"}, nil, &out, &errb); code != 0 {
		t.Fatalf("prune with the configured policy: exit %d %s", code, errb.String())
	}
	for vm, want := range map[string]int{"a": 1, "b": 2} {
		r := e.ok("snapshots", vm, "--json")
		var gens []generationJSON
		json.Unmarshal([]byte(r.stdout), &gens)
		if len(gens) != want {
			t.Fatalf("VM %s keeps %d generations, want %d", vm, len(gens), want)
		}
	}
	// forget without flags and without a configured policy is a usage error.
	e.fails(exitUsage, "no policy", "forget")
}

// planLines returns the "plan:" lines of prune's output.
func planLines(out string) []string {
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "plan: ") {
			lines = append(lines, l)
		}
	}
	return lines
}

// prune --dry-run prints exactly the plan that prune then carries out:
// the same lines, and the objects it lists are the objects that go.
func TestPruneDryRunIsThePlan(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "img")
	for d := range 3 {
		os.WriteFile(src, dayImage(d), 0o600)
		backupAt(t, e, "vm01", src, time.Date(2026, 1, 1+d, 12, 0, 0, 0, time.UTC))
	}
	args := []string{"prune", "--keep-last", "1", "--safety-margin", "0", "-v"}
	dry := planLines(e.ok(append(args, "--dry-run")...).stdout)
	before := map[string]bool{}
	filepath.Walk(filepath.Join(e.repo, "data"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			rel, _ := filepath.Rel(e.repo, p)
			before[filepath.ToSlash(rel)] = true
		}
		return nil
	})
	done := planLines(e.ok(args...).stdout)
	if strings.Join(dry, "\n") != strings.Join(done, "\n") {
		t.Fatalf("dry run plan:\n%s\nexecuted plan:\n%s", strings.Join(dry, "\n"), strings.Join(done, "\n"))
	}
	listed := 0
	for _, l := range dry {
		name, ok := strings.CutPrefix(l, "plan: remove data/")
		if !ok {
			continue
		}
		name = "data/" + strings.Fields(name)[0]
		listed++
		if !before[name] {
			t.Fatalf("plan lists %s, which did not exist", name)
		}
		if _, err := os.Stat(filepath.Join(e.repo, name)); !os.IsNotExist(err) {
			t.Fatalf("planned %s is still there", name)
		}
	}
	after := countFiles(filepath.Join(e.repo, "data"))
	if listed == 0 || len(before)-after != listed {
		t.Fatalf("plan listed %d objects, %d went", listed, len(before)-after)
	}
}
