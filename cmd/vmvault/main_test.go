package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// env is a repository and password in a temp dir, driven through run().
type env struct {
	t     *testing.T
	dir   string
	repo  string
	pw    string
	cache string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	e := &env{t: t, dir: dir, repo: filepath.Join(dir, "repo"), pw: filepath.Join(dir, "pw"), cache: filepath.Join(dir, "cache")}
	if err := os.WriteFile(e.pw, []byte("correct horse\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	e.ok("init", "--kdf-params", "t=1,m=8192,p=1", "--segment-size", "4194304")
	return e
}

type result struct {
	code           int
	stdout, stderr string
}

func (e *env) run(stdin []byte, args ...string) result {
	e.t.Helper()
	full := append([]string{"--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache}, args...)
	var out, errb bytes.Buffer
	code := run(context.Background(), full, bytes.NewReader(stdin), &out, &errb)
	return result{code, out.String(), errb.String()}
}

func (e *env) ok(args ...string) result {
	e.t.Helper()
	r := e.run(nil, args...)
	if r.code != 0 {
		e.t.Fatalf("vmvault %v: exit %d: %s", args, r.code, r.stderr)
	}
	return r
}

func (e *env) fails(code int, want string, args ...string) result {
	e.t.Helper()
	r := e.run(nil, args...)
	if r.code != code || !strings.Contains(r.stderr, want) {
		e.t.Fatalf("vmvault %v: exit %d (want %d), stderr %q (want %q)", args, r.code, code, r.stderr, want)
	}
	if n := strings.Count(strings.TrimSpace(r.stderr), "\n"); n > 0 && strings.HasPrefix(r.stderr, "vmvault:") {
		e.t.Fatalf("error spans %d lines: %q", n+1, r.stderr)
	}
	return r
}

func writeImage(t *testing.T, path string, seed uint64, size int) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 2))
	img := make([]byte, size)
	for i := 0; i < size/2; i++ {
		img[i] = byte(rng.Uint32())
	}
	copy(img[size*3/4:], bytes.Repeat([]byte("log line\n"), size/40))
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	return img
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestBackupRestoreCLI(t *testing.T) {
	e := newEnv(t)
	img := writeImage(t, filepath.Join(e.dir, "vm01.raw"), 1, 10<<20)
	r := e.ok("backup", "vm01", "--source", filepath.Join(e.dir, "vm01.raw"), "--tag", "nightly", "--time", "2026-01-01T00:00:00Z", "--json", "--sha256")
	var s backupSummary
	if err := json.Unmarshal([]byte(r.stdout), &s); err != nil {
		t.Fatalf("backup --json: %v: %q", err, r.stdout)
	}
	if s.VM != "vm01" || s.BytesRead != int64(len(img)) || s.BytesNew == 0 || s.BytesStored == 0 || len(s.ID) != 64 {
		t.Fatalf("summary %+v", s)
	}
	// Per disk: how it was read (whole: cbt "none") and the bytes read.
	if len(s.DiskStats) != 1 || s.DiskStats[0].Name != s.Disks[0] || s.DiskStats[0].CBT != "none" || s.DiskStats[0].BytesRead != int64(len(img)) ||
		!strings.Contains(r.stdout, `"cbt":"none"`) {
		t.Fatalf("disk_stats %+v in %s", s.DiskStats, r.stdout)
	}
	// stdin source
	e.run(img, "backup", "vm02", "--source", "-")
	r = e.ok("snapshots", "--json")
	var gens []generationJSON
	if err := json.Unmarshal([]byte(r.stdout), &gens); err != nil || len(gens) != 2 {
		t.Fatalf("snapshots --json: %v %q", err, r.stdout)
	}
	if gens[0].VM != "vm01" || gens[0].Tags[0] != "nightly" || gens[0].Time.Year() != 2026 || gens[0].Disks[0].SHA256 != sum(img) {
		t.Fatalf("generation %+v", gens[0])
	}
	if gens[1].BytesNew != 0 {
		t.Fatalf("identical image stored %d new bytes", gens[1].BytesNew)
	}
	r = e.ok("snapshots", "vm02")
	if !strings.Contains(r.stdout, "vm02") || strings.Contains(r.stdout, "vm01") {
		t.Fatalf("snapshots vm02: %q", r.stdout)
	}
	// Restore by "latest" and by ID prefix, to stdout and in place.
	if out := e.ok("restore", "vm01", "latest").stdout; sum([]byte(out)) != sum(img) {
		t.Fatal("restore latest differs")
	}
	if out := e.ok("restore", "vm01", s.ID[:6]).stdout; sum([]byte(out)) != sum(img) {
		t.Fatal("restore by prefix differs")
	}
	target := filepath.Join(e.dir, "target.raw")
	e.ok("restore", "vm02", "latest", "--target", target)
	got, _ := os.ReadFile(target)
	if sum(got) != sum(img) {
		t.Fatal("restore --target differs")
	}
	e.ok("check", "--read-data")
	e.ok("check", "--read-data-subset", "50%")
}

func TestBadInputCLI(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 2, 6<<20)
	e.ok("backup", "vm01", "--source", src)

	wrong := filepath.Join(e.dir, "wrong")
	os.WriteFile(wrong, []byte("nope"), 0o600)
	e.fails(exitWrongPass, "wrong password", "--password-file", wrong, "snapshots")
	e.fails(exitNoRepo, "no such file", "--repo", filepath.Join(e.dir, "missing"), "snapshots")
	e.fails(exitNoRepo, "not a vmvault repository", "--repo", e.dir, "snapshots")
	e.fails(exitError, "no such generation", "restore", "vm01", "deadbeef")
	e.fails(exitError, "has no generations", "restore", "vm99", "latest")
	e.fails(exitUsage, "unknown flag", "backup", "vm01", "--bogus")
	e.fails(exitUsage, "no --source", "backup", "vm01")
	e.fails(exitError, "no such file", "backup", "vm01", "--source", filepath.Join(e.dir, "nope.raw"))

	open := filepath.Join(e.dir, "open-pw")
	os.WriteFile(open, []byte("correct horse"), 0o644)
	e.fails(exitError, "chmod 600", "--password-file", open, "snapshots")

	// Full output device: restore fails loudly.
	if f, err := os.OpenFile("/dev/full", os.O_WRONLY, 0); err == nil {
		var errb bytes.Buffer
		code := run(context.Background(), []string{"--repo", e.repo, "--password-file", e.pw, "--cache-dir", e.cache, "restore", "vm01", "latest"}, nil, f, &errb)
		f.Close()
		if code != exitError || !strings.Contains(errb.String(), "no space left") {
			t.Fatalf("restore to /dev/full: exit %d %q", code, errb.String())
		}
	}
}

func TestDamageCLI(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 3, 6<<20)
	e.ok("backup", "vm01", "--source", src)
	var victim string
	var size int64
	filepath.WalkDir(filepath.Join(e.repo, "data"), func(p string, d fs.DirEntry, err error) error {
		if fi, err := d.Info(); err == nil && !d.IsDir() && fi.Size() > size {
			victim, size = p, fi.Size()
		}
		return nil
	})
	data, _ := os.ReadFile(victim)
	data[100] ^= 1
	os.Chmod(victim, 0o600)
	os.WriteFile(victim, data, 0o600)
	name := filepath.Base(victim)

	r := e.fails(exitError, name, "check", "--read-data")
	if !strings.Contains(r.stdout, "damaged: data/"+name[:2]+"/"+name) || !strings.Contains(r.stdout, "vm01/") {
		t.Fatalf("check output does not name the object and generation: %q", r.stdout)
	}
	r = e.fails(exitError, name, "restore", "vm01", "latest")
	if int64(len(r.stdout)) >= 6<<20 {
		t.Fatal("restore emitted a full image from a damaged repository")
	}
	// Truncated object: the structural check alone finds it.
	os.WriteFile(victim, data[:10], 0o600)
	e.fails(exitError, name, "check")
	os.Remove(victim)
	e.fails(exitError, "missing", "check")
}

// Interrupting a backup commits nothing; the rerun reuses what arrived.
func TestKilledBackupCommitsNothing(t *testing.T) {
	if os.Getenv("VMVAULT_HELPER_PROCESS") == "1" {
		args := os.Args
		for i, a := range args {
			if a == "--" {
				args = args[i+1:]
				break
			}
		}
		os.Exit(run(context.Background(), args, os.Stdin, os.Stdout, os.Stderr))
	}
	e := newEnv(t)
	src := filepath.Join(e.dir, "big.raw")
	img := writeImage(t, src, 4, 64<<20)
	// The child backs up from stdin; we feed half the image, wait until
	// objects have arrived in the repository, then SIGKILL it.
	child := exec.Command(os.Args[0], "-test.run=^TestKilledBackupCommitsNothing$", "--", "--cache-dir", e.cache, "backup", "vm01", "--source", "-")
	child.Env = append(os.Environ(), "VMVAULT_HELPER_PROCESS=1", "VMVAULT_REPOSITORY="+e.repo, "VMVAULT_PASSWORD_FILE="+e.pw)
	stdin, _ := child.StdinPipe()
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	stdin.Write(img[:40<<20])
	deadline := time.Now().Add(30 * time.Second)
	for countObjects(e.repo) < 10 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	arrived := countObjects(e.repo)
	child.Process.Kill()
	child.Wait()
	if arrived < 10 {
		t.Fatalf("only %d objects arrived before the kill", arrived)
	}
	r := e.ok("snapshots", "--json")
	if strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("killed backup left a generation: %s", r.stdout)
	}
	e.ok("check")
	r = e.ok("backup", "vm01", "--source", src, "--json")
	var s backupSummary
	json.Unmarshal([]byte(r.stdout), &s)
	// The killed run's journal lets the rerun index what had arrived
	// instead of sending it again (a handful may have completed in the
	// instant between the upload and its journal record).
	if !strings.Contains(r.stderr, "indexed objects an interrupted backup had stored") || s.ObjectsFound > 4 {
		t.Fatalf("rerun did not reuse the %d objects that had arrived: found again %d; %s", arrived, s.ObjectsFound, r.stderr)
	}
	out := e.ok("restore", "vm01", "latest").stdout
	if sum([]byte(out)) != sum(img) {
		t.Fatal("restore after a killed backup differs")
	}
	e.ok("check", "--read-data")
}

func countObjects(repo string) int {
	n := 0
	filepath.WalkDir(filepath.Join(repo, "data"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && !strings.HasPrefix(d.Name(), ".tmp-") {
			n++
		}
		return nil
	})
	return n
}

func TestKeyCommands(t *testing.T) {
	e := newEnv(t)
	second := filepath.Join(e.dir, "second")
	os.WriteFile(second, []byte("second password\n"), 0o600)
	r := e.ok("key", "add", "--new-password-file", second, "--kdf-params", "t=1,m=8192,p=1")
	if !strings.Contains(r.stderr, "added key") {
		t.Fatalf("key add: %s", r.stderr)
	}
	r = e.ok("key", "list", "--json")
	var keys []struct {
		ID      string `json:"id"`
		Current bool   `json:"current"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &keys); err != nil || len(keys) != 2 {
		t.Fatalf("key list: %v %s", err, r.stdout)
	}
	// The second password opens the repository.
	e.ok("--password-file", second, "snapshots")
	// The key in use cannot be removed; the other one can.
	var cur, other string
	for _, k := range keys {
		if k.Current {
			cur = k.ID
		} else {
			other = k.ID
		}
	}
	e.fails(exitError, "in use", "key", "remove", cur[:8])
	e.ok("key", "remove", other[:8])
	e.fails(exitWrongPass, "wrong password", "--password-file", second, "snapshots")
	// passwd: the new password works, the old one no longer does.
	newpw := filepath.Join(e.dir, "new")
	os.WriteFile(newpw, []byte("new password\n"), 0o600)
	e.ok("key", "passwd", "--new-password-file", newpw, "--kdf-params", "t=1,m=8192,p=1")
	e.ok("--password-file", newpw, "snapshots")
	e.fails(exitWrongPass, "wrong password", "snapshots")
}
