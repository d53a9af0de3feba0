package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"vmvault/repo"
)

// Two --source backups of one VM at once: the second exits 11 at once
// (the docs' promise), the first completes. Two real processes, so the
// lock is the kernel's flock, not something in this process.
func TestSourceBackupsOfOneVMDoNotOverlap(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	img := writeImage(t, src, 31, 2<<20)

	first := helper(e, "backup", "vm01", "--source", "-")
	stdin, err := first.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var errFirst bytes.Buffer
	first.Stderr = &errFirst
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	defer first.Process.Kill()
	// Wait until the first run holds its repository lock: by then it is
	// committed to backing up vm01 (and, with the fix, holds the VM lock,
	// which is taken first).
	deadline := time.Now().Add(30 * time.Second)
	for {
		if locks, _ := filepath.Glob(filepath.Join(e.repo, "locks", "*")); len(locks) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the first backup took no repository lock: %s", errFirst.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	stdin.Write(img[:1<<20])

	second := helper(e, "backup", "vm01", "--source", src)
	out, err := second.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitLocked || !strings.Contains(string(out), "already running") {
		t.Fatalf("second backup of vm01: %v: %s", err, out)
	}

	stdin.Write(img[1<<20:])
	stdin.Close()
	if err := first.Wait(); err != nil {
		t.Fatalf("first backup: %v: %s", err, errFirst.String())
	}
	if got := sum([]byte(e.ok("restore", "vm01", "latest").stdout)); got != sum(img) {
		t.Fatal("the first backup restores wrong")
	}
}

// One rule for VM names: what the configuration rejects, the command
// line rejects too, before anything is read or written.
func TestCLIRejectsVMNamesTheConfigRejects(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 32, 1<<20)
	prom := filepath.Join(e.dir, "vmvault.prom")
	for _, name := range []string{"bad/name", "a b", ".hidden", "../vm", "vm\x1b[2J"} {
		e.fails(exitUsage, "invalid VM name", "backup", name, "--source", src, "--metrics-file", prom)
	}
	if _, err := os.Stat(prom); err == nil {
		t.Fatal("metrics recorded for a VM name that is refused")
	}
	if r := e.ok("snapshots", "--json"); strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("a rejected name was backed up: %s", r.stdout)
	}
}

// --password-file follows the rule of [repository] password_file: a file
// that group or others can read is refused.
func TestPasswordFileModeRule(t *testing.T) {
	e := newEnv(t)
	for _, mode := range []os.FileMode{0o640, 0o604, 0o644} {
		if err := os.Chmod(e.pw, mode); err != nil {
			t.Fatal(err)
		}
		r := e.fails(exitError, "chmod 600", "snapshots")
		if !strings.Contains(r.stderr, e.pw) {
			t.Fatalf("mode %o: the error does not name the file: %s", mode, r.stderr)
		}
	}
	os.Chmod(e.pw, 0o600)
	e.ok("snapshots")
	// A huge file is not a password file.
	big := filepath.Join(e.dir, "big")
	os.WriteFile(big, bytes.Repeat([]byte("x"), 1<<20), 0o600)
	e.fails(exitError, "not a password file", "--password-file", big, "snapshots")
}

// --syslog without a syslog socket (a container, journald stopped) does
// not stop commands: one warning on stderr, then everything as usual,
// including the error path's messages.
func TestSyslogUnavailableFallsBackToStderr(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 33, 1<<20)
	gone := filepath.Join(e.dir, "no-such-dir", "log")
	cmd := helper(e, "--syslog", "--syslog-socket", gone, "backup", "vm01", "--source", src)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("backup with --syslog and no syslog: %v: %s", err, out)
	}
	if n := strings.Count(string(out), "syslog is unavailable"); n != 1 || !strings.Contains(string(out), "vm01: ok") {
		t.Fatalf("want one warning and the summary, got %d warnings: %s", n, out)
	}
	cmd = helper(e, "--syslog", "--syslog-socket", gone, "-q", "snapshots", "vm01")
	if out, err := cmd.CombinedOutput(); err != nil || strings.Count(string(out), "syslog is unavailable") != 1 {
		t.Fatalf("snapshots -q with --syslog and no syslog: %v: %s", err, out)
	}
	cmd = helper(e, "--syslog", "--syslog-socket", gone, "restore", "vm09", "latest")
	out, _ = cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() == 0 || !strings.Contains(string(out), "vm09") {
		t.Fatalf("a failing command still says why: exit %d: %s", cmd.ProcessState.ExitCode(), out)
	}
}

// Names and tags read from a repository reach the terminal escaped: a
// hostile writer (anyone with the append-only account) cannot drive the
// admin's terminal. JSON keeps the exact strings, JSON-escaped.
func TestTerminalEscapesAreNeutralised(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 34, 1<<20)
	const title = "\x1b]0;owned\x07"
	e.ok("backup", "vm01", "--source", src, "--tag", title, "--tag", "bidi\u202eevil")
	// A VM name the CLI refuses, written as an older or hostile client would.
	a := &app{stdout: os.Stdout, stderr: os.Stderr, repoURL: e.repo, passwordFile: e.pw, cacheDir: e.cache}
	a.setup()
	r, err := a.openRepo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	const clear = "vm\x1b[2J\u009b"
	_, err = r.Backup(context.Background(), repo.BackupRequest{VM: clear, Disks: []repo.DiskSource{{Name: "d\x1b[1m", Reader: strings.NewReader("x"), Size: 1}}})
	r.Close()
	r.Backend().Close()
	if err != nil {
		t.Fatal(err)
	}

	out := e.ok("snapshots").stdout
	if strings.ContainsAny(out, "\x1b\x07\u202e\u009b") {
		t.Fatalf("raw control characters in the listing: %q", out)
	}
	for _, want := range []string{`\x1b]0;owned\a`, `vm\x1b[2J\u009b`, `bidi\u202eevil`} {
		if !strings.Contains(out, want) {
			t.Fatalf("listing lacks %q: %q", want, out)
		}
	}
	var gens []generationJSON
	if err := json.Unmarshal([]byte(e.ok("snapshots", "--json").stdout), &gens); err != nil {
		t.Fatal(err)
	}
	if len(gens) != 2 || !slices.Contains(gens[0].Tags, title) || gens[1].VM != clear {
		t.Fatalf("JSON does not keep the exact strings: %+v", gens)
	}
	// forget's decisions and stats print the name escaped too.
	for _, args := range [][]string{{"forget", "--keep-last", "1", "--dry-run"}, {"stats"}} {
		out := e.ok(args...).stdout
		if strings.ContainsAny(out, "\x1b\u009b") || !strings.Contains(out, `vm\x1b[2J\u009b`) {
			t.Fatalf("%v: raw or missing name: %q", args, out)
		}
	}
	// Errors that quote such a name are escaped too.
	r2 := e.run(nil, "restore", clear, "nosuchgeneration")
	if r2.code == 0 || strings.ContainsRune(r2.stderr, 0x1b) {
		t.Fatalf("restore error: exit %d: %q", r2.code, r2.stderr)
	}
}

func TestTermSafe(t *testing.T) {
	for in, want := range map[string]string{
		"vm01":        "vm01",
		"a\tb\nc":     "a\tb\nc",
		"\x1b[31mred": `\x1b[31mred`,
		"bell\a":      `bell\a`,
		"del\x7f":     `del\x7f`,
		"c1\u009b2J":  `c1\u009b2J`,
		"raw\x9b":     `raw\x9b`,
		"ünïcödé ok":  "ünïcödé ok",
		"rtl\u202e":   `rtl\u202e`,
		"nul\x00":     `nul\x00`,
	} {
		if got := termSafe(in); got != want {
			t.Errorf("termSafe(%q) = %q, want %q", in, got, want)
		}
	}
}

// One name for one thing: the command is generations; snapshots (restic
// users' habit) and list are aliases that print the same.
func TestGenerationsCommand(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "vm01.raw")
	writeImage(t, src, 35, 1<<20)
	e.ok("backup", "vm01", "--source", src)
	want := e.ok("generations", "vm01", "--json").stdout
	for _, alias := range []string{"snapshots", "list"} {
		if got := e.ok(alias, "vm01", "--json").stdout; got != want {
			t.Fatalf("%s prints %q, generations %q", alias, got, want)
		}
	}
	help := e.ok("--help").stdout
	if !strings.Contains(help, "\n  generations ") || strings.Contains(help, "\n  snapshots ") {
		t.Fatalf("root help does not list generations as the command: %s", help)
	}
}
