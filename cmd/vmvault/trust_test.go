package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"vmvault/retention"
)

// pidFreeOnHost returns a PID between 300 and 30000 that no process of
// the host's PID namespace has: a backup given this PID in another
// namespace looks "dead" to a host that trusts kill(pid, 0).
func pidFreeOnHost(t *testing.T) int {
	for p := 300 + rand.IntN(1000); p < 30000; p++ {
		if _, err := os.Stat("/proc/" + strconv.Itoa(p)); os.IsNotExist(err) {
			return p
		}
	}
	t.Skip("no free PID")
	return 0
}

// nsBackup starts `backup VM --source -` as PID pid of a new PID namespace
// (unshare -p, real processes) and returns it with its stdin.
func nsBackup(t *testing.T, e *env, vm string, pid int) (*exec.Cmd, io.WriteCloser, *bytes.Buffer) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("unshare -p needs root")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("no unshare")
	}
	args := []string{os.Args[0], "--", "--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache, "backup", vm, "--source", "-"}
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	// The shell is PID 1; each /bin/true takes the next PID, so vmvault
	// (not the last command: the shell forks for it) gets pid.
	script := fmt.Sprintf(`i=2; while [ $i -lt %d ]; do /bin/true; i=$((i+1)); done; %s; s=$?; exit $s`, pid, strings.Join(quoted, " "))
	cmd := exec.Command("unshare", "-p", "-f", "--mount-proc", "sh", "-c", script)
	cmd.Env = append(os.Environ(), "VMVAULT_HELPER_MAIN=1")
	var errb bytes.Buffer
	cmd.Stderr = &errb
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// A test that fails half-way must not leave the backup waiting on
	// its stdin forever: EOF lets it finish, and unshare is killed.
	t.Cleanup(func() {
		stdin.Close()
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd, stdin, &errb
}

func countFiles(dir string) int {
	n := 0
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n++
		}
		return nil
	})
	return n
}

// waitFor polls cond for up to 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// Issue 9 item 5: a backup in another PID namespace whose PID does not
// exist on the host. Before leases, prune from the host judged its lock
// stale, deleted its uploads, and the backup then reported success over
// a broken generation. Now prune refuses (lock held), a dry run lists
// none of its objects, and a backup whose lock was removed behind its
// back (unlock --remove-all) commits nothing, while prune's safety
// margin keeps its uploads.
func TestPruneDuringBackupInOtherPIDNamespace(t *testing.T) {
	e := newEnv(t)
	// Content-defined segments of 4 MiB on average are cut after up to
	// 6 MiB: 13 MiB written up front always completes (and uploads) at
	// least one segment while the backup still waits for the rest.
	var img []byte
	for d := 3; d <= 8; d++ {
		img = append(img, dayImage(d)...) // 18 MiB in all
	}
	data := filepath.Join(e.repo, "data")
	base := countFiles(data)

	pid := pidFreeOnHost(t)
	child, stdin, errb := nsBackup(t, e, "vm01", pid)
	stdin.Write(img[:13<<20])
	waitFor(t, "the namespaced backup's uploads", func() bool { return countFiles(data) > base })
	r := e.run(nil, "prune", "--safety-margin", "0")
	if r.code != exitLocked || !strings.Contains(r.stderr, fmt.Sprintf("PID %d", pid)) {
		t.Fatalf("prune during a backup in another PID namespace: exit %d %s", r.code, r.stderr)
	}
	r = e.ok("prune", "--dry-run", "-v")
	if !strings.Contains(r.stdout, "plan: remove 0 unreferenced object(s)") || strings.Contains(r.stdout, "plan: remove data/") {
		t.Fatalf("dry run lists the running backup's objects: %s", r.stdout)
	}
	stdin.Write(img[13<<20:])
	stdin.Close()
	if err := child.Wait(); err != nil {
		t.Fatalf("backup: %v: %s", err, errb)
	}
	e.ok("check", "--read-data")
	if out := e.ok("restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(img) {
		t.Fatal("restore differs")
	}

	// The lock removed while the backup runs: prune cannot see it, its
	// margin keeps the uploads, and the backup does not commit.
	var img2 []byte
	for d := 9; d <= 14; d++ {
		img2 = append(img2, dayImage(d)...)
	}
	before := countFiles(data)
	child, stdin, errb = nsBackup(t, e, "vm02", pidFreeOnHost(t))
	stdin.Write(img2[:13<<20])
	waitFor(t, "the second backup's uploads", func() bool { return countFiles(data) > before })
	if r := e.ok("unlock", "--remove-all"); !strings.Contains(r.stderr, "removed 1 lock(s)") {
		t.Fatalf("unlock: %s", r.stderr)
	}
	uploaded := countFiles(data)
	r = e.ok("prune")
	if countFiles(data) < uploaded || !strings.Contains(r.stdout, "plan: remove 0 unreferenced object(s)") {
		t.Fatalf("prune removed a running backup's uploads: %d → %d\n%s", uploaded, countFiles(data), r.stdout)
	}
	stdin.Write(img2[13<<20:])
	stdin.Close()
	err := child.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitLocked || !strings.Contains(errb.String(), "lost its repository lock") {
		t.Fatalf("backup whose lock was removed: %v: %s", err, errb)
	}
	e.fails(exitError, "has no generations", "snapshots", "vm02")
	e.ok("check")
}

// Issue 9 item 4: with only the append-only account, an attacker adds a
// generation dated one minute after each genuine one, all written now.
// forget keeps exactly the generations it keeps without the attack, and
// restore latest does not return the attacker's image; a generation
// dated in the future does not become latest either.
func TestRetentionAttackByRecordedTime(t *testing.T) {
	e := newEnv(t)
	genuine := filepath.Join(e.dir, "genuine")
	evil := filepath.Join(e.dir, "evil")
	os.WriteFile(genuine, bytes.Repeat([]byte("genuine "), 8192), 0o600)
	os.WriteFile(evil, bytes.Repeat([]byte("evil!!! "), 8192), 0o600)
	now := time.Now()
	var gens []retention.Generation
	var times []time.Time
	for d := 60; d >= 2; d -= 2 { // every other day for two months, the newest two days ago
		at := now.Add(-time.Duration(d) * 24 * time.Hour)
		id := backupAt(t, e, "vm01", genuine, at)
		gens = append(gens, retention.Generation{ID: id, Time: at, Group: "g"})
		times = append(times, at)
	}
	for _, at := range times {
		e.ok("backup", "vm01", "--source", evil, "--time", at.Add(time.Minute).Format(time.RFC3339))
	}
	e.ok("backup", "vm01", "--source", evil, "--time", now.AddDate(1, 0, 0).Format(time.RFC3339))
	if out := e.ok("restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(bytes.Repeat([]byte("genuine "), 8192)) {
		t.Fatal("restore latest returns the attacker's image")
	}
	pol := retention.Policy{Daily: 7, Weekly: 5, Monthly: 12}
	want := map[string]bool{}
	for _, d := range retention.Apply(gens, pol, now, time.Local) {
		if d.Keep {
			want[d.ID] = true
		}
	}
	r := e.ok("forget", "--keep-daily", "7", "--keep-weekly", "5", "--keep-monthly", "12", "--json")
	var res forgetResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil {
		t.Fatal(err)
	}
	if res.Unverified != len(times) {
		t.Fatalf("%d unverified, want %d", res.Unverified, len(times))
	}
	future := res.Decisions[0] // newest first
	if !future.Keep || len(future.Reasons) != 1 || future.Reasons[0] != retention.ReasonFuture {
		t.Fatalf("future-dated generation: %+v", future)
	}
	for _, g := range gens {
		var kept bool
		for _, d := range res.Decisions {
			if d.ID == g.ID {
				kept = d.Keep
			}
		}
		if kept != want[g.ID] {
			t.Fatalf("genuine generation of %s: kept %v, without the attack %v", g.Time, kept, want[g.ID])
		}
	}
	if !strings.Contains(r.stderr, "recorded time disagrees with when it arrived") {
		t.Fatalf("no warning: %s", r.stderr)
	}
	var listed []generationJSON
	json.Unmarshal([]byte(e.ok("generations", "vm01", "--json").stdout), &listed)
	unverified := 0
	for _, g := range listed {
		if g.Unverified {
			unverified++
		}
	}
	if unverified != len(times)+1 { // the future-dated one too
		t.Fatalf("generations --json marks %d unverified, want %d", unverified, len(times)+1)
	}
}

// Issue 9 item 7: junk in manifests/ and locks/ stops none of the admin's
// tools; each junk object is named in one warning.
func TestJunkFilesCLI(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "img")
	want := writeImage(t, src, 5, 1<<20)
	e.ok("backup", "vm01", "--source", src)
	os.WriteFile(filepath.Join(e.repo, "manifests", "x"), []byte("x"), 0o600)
	future := time.Now().AddDate(5, 0, 0)
	junkLock := filepath.Join(e.repo, "locks", "junk")
	os.WriteFile(junkLock, []byte("x"), 0o600)
	os.Chtimes(junkLock, future, future)
	e.ok("backup", "vm01", "--source", src) // the junk lock does not block
	if r := e.ok("unlock"); !strings.Contains(r.stderr, "removed 1 lock(s)") {
		t.Fatalf("unlock of a future-dated junk lock: %s", r.stderr)
	}
	for _, args := range [][]string{{"snapshots"}, {"forget", "--keep-last", "1"}, {"prune"}, {"check"}, {"stats"}} {
		r := e.ok(args...)
		if n := strings.Count(r.stderr, "manifests/x"); n != 1 {
			t.Fatalf("%v: manifests/x named %d times: %s", args, n, r.stderr)
		}
	}
	if out := e.ok("restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(want) {
		t.Fatal("restore latest")
	}
}

// Issue 9 item 10: a VM without generations is an error naming the VMs
// that have some; --read-data-subset reads at least one chunk and wants
// a "%".
func TestNoGenerationsAndSubset(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "img")
	writeImage(t, src, 6, 1<<20)
	e.ok("backup", "vm01", "--source", src)
	for _, args := range [][]string{{"snapshots", "vm9"}, {"stats", "vm9"}, {"forget", "vm9", "--keep-last", "1"}} {
		e.fails(exitError, `VM "vm9" has no generations (VMs with generations: vm01)`, args...)
	}
	e.fails(exitUsage, "want a percentage", "check", "--read-data-subset", "0.5")
	e.fails(exitUsage, "must not be negative", "prune", "--safety-margin", "-1h")
	r := e.ok("check", "--read-data-subset", "0.0001%", "--json")
	var res checkResult
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.ChunksRead < 1 {
		t.Fatalf("subset check read %d chunks: %v", res.ChunksRead, err)
	}
}
