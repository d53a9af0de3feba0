package quiesce

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"vmvault/internal/testsshd"
)

// The "guest" in these tests is this machine, reached through a real
// sshd on loopback, so guest commands are real shell commands.
//
// One stand-in: fsfreeze. Freezing needs a file system of its own (a
// loop-mounted image), which this machine cannot provide, and freezing
// a file system the host is using would stall the test machine. So
// FreezeCommand points to a script that logs its arguments; the real
// fsfreeze -f/-u runs in the LVM guest test of the whole backup.
func freezeScript(t *testing.T, dir, body string) (cmd, logFile string) {
	t.Helper()
	logFile = filepath.Join(dir, "freeze.log")
	script := filepath.Join(dir, "fsfreeze-standin.sh")
	text := "#!/bin/sh\necho \"$*\" >> " + shellQuote(logFile) + "\n" + body + "\n"
	if err := os.WriteFile(script, []byte(text), 0o755); err != nil {
		t.Fatal(err)
	}
	return script, logFile
}

// killRecorded registers a cleanup that kills the processes whose PIDs a
// guest command wrote to pidFile: a timed-out command is orphaned in the
// "guest" (this machine) and would otherwise outlive the test.
func killRecorded(t *testing.T, pidFile string) {
	t.Cleanup(func() {
		for _, f := range strings.Fields(readFile(t, pidFile)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return string(b)
}

func guestConfig(s *testsshd.Server) *GuestConfig {
	return &GuestConfig{Addr: s.Addr, User: s.User, KeyFile: s.ClientKeyFile, KnownHostsFile: s.KnownHostsFile}
}

func TestHoldRunsGuestStepsInOrder(t *testing.T) {
	setupDB(t)
	s := testsshd.Start(t, testsshd.Options{})
	dir := t.TempDir()
	order := filepath.Join(dir, "order")
	freeze, freezeLog := freezeScript(t, dir, "exit 0")
	g := guestConfig(s)
	g.BeforeSnapshot = []string{"echo one >> " + order, "echo two >> " + order}
	g.AfterSnapshot = []string{"echo after >> " + order}
	g.FreezeMounts = []string{"/srv/a", "/srv/b c"}
	g.FreezeCommand = freeze

	var logs bytes.Buffer
	q := New(Config{VM: "vm01", Guest: g, Databases: []Database{backupDB()}, Logger: logTo(&logs)})
	h, err := q.Hold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, order); got != "one\ntwo\n" {
		t.Errorf("during hold, order file = %q, want before-snapshot commands in order", got)
	}
	if got := readFile(t, freezeLog); got != "-f /srv/a\n-f /srv/b c\n" {
		t.Errorf("during hold, freeze log = %q", got)
	}
	// Database locked before the freeze, sync before the database.
	l := logs.String()
	iSync, iLock, iFreeze := strings.Index(l, "command=sync"), strings.Index(l, "database locked"), strings.Index(l, "-f '/srv/a'")
	if iSync < 0 || iLock < iSync || iFreeze < iLock {
		t.Errorf("want sync, then database lock, then freeze; log:\n%s", l)
	}

	// Release from a cancelled context, as after Ctrl-C: it must still thaw.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rep := h.Release(ctx)
	if rep.Err != nil {
		t.Fatalf("release: %v", rep.Err)
	}
	if got, want := readFile(t, freezeLog), "-f /srv/a\n-f /srv/b c\n-u /srv/b c\n-u /srv/a\n"; got != want {
		t.Errorf("freeze log = %q, want %q (thaw in reverse order)", got, want)
	}
	if got := readFile(t, order); got != "one\ntwo\nafter\n" {
		t.Errorf("after release, order file = %q", got)
	}
	if !rep.Synced || len(rep.Frozen) != 2 || rep.Databases[0].Status != DBLocked || rep.Held <= 0 {
		t.Errorf("report = %+v", rep)
	}
	assertWritable(t, rootDB(t))
}

func TestFailingGuestCommandIsReported(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	dir := t.TempDir()
	marker := filepath.Join(dir, "after-ran")
	g := guestConfig(s)
	g.BeforeSnapshot = []string{"true", "echo disk trouble >&2; exit 3", "touch " + filepath.Join(dir, "not-reached")}
	g.AfterSnapshot = []string{"touch " + marker}
	_, err := New(Config{VM: "vm01", Guest: g}).Hold(context.Background())
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitStatus != 3 {
		t.Fatalf("err = %v, want a CommandError with exit status 3", err)
	}
	for _, want := range []string{"vm01", "exit 3", "status 3", "disk trouble"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "not-reached")); err == nil {
		t.Error("a command after the failing one ran")
	}
	if _, err := os.Stat(marker); err != nil {
		t.Errorf("after-snapshot commands did not run when Hold failed: %v", err)
	}
}

func TestFreezeFailureThawsAndUnlocks(t *testing.T) {
	setupDB(t)
	s := testsshd.Start(t, testsshd.Options{})
	dir := t.TempDir()
	freeze, freezeLog := freezeScript(t, dir, `[ "$*" = "-f /srv/b" ] && { echo "cannot freeze" >&2; exit 1; }; exit 0`)
	g := guestConfig(s)
	g.FreezeMounts = []string{"/srv/a", "/srv/b", "/srv/c"}
	g.FreezeCommand = freeze
	_, err := New(Config{VM: "vm01", Guest: g, Databases: []Database{backupDB()}}).Hold(context.Background())
	if err == nil || !strings.Contains(err.Error(), "cannot freeze") || !strings.Contains(err.Error(), "/srv/b") {
		t.Fatalf("err = %v, want the failed freeze of /srv/b", err)
	}
	if got, want := readFile(t, freezeLog), "-f /srv/a\n-f /srv/b\n-u /srv/b\n-u /srv/a\n"; got != want {
		t.Errorf("freeze log = %q, want %q", got, want)
	}
	assertWritable(t, rootDB(t))
}

func TestFreezeTimeoutThaws(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	dir := t.TempDir()
	pids := filepath.Join(dir, "pids")
	killRecorded(t, pids)
	freeze, freezeLog := freezeScript(t, dir, `[ "$1" = -f ] && { echo $$ >> `+pids+`; sleep 30 & echo $! >> `+pids+`; wait; }; exit 0`)
	g := guestConfig(s)
	g.FreezeMounts = []string{"/srv/a"}
	g.FreezeCommand = freeze
	// Long enough for the guest's shell to start even on a loaded
	// machine, so the timeout hits the hanging freeze itself.
	g.FreezeTimeout = 3 * time.Second
	start := time.Now()
	_, err := New(Config{VM: "vm01", Guest: g}).Hold(context.Background())
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want a freeze timeout", err)
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("Hold took %v with a 3s freeze timeout", took)
	}
	if got := readFile(t, freezeLog); !strings.Contains(got, "-u /srv/a") {
		t.Errorf("freeze log = %q, want a thaw after the timed-out freeze", got)
	}
}

func TestHostKeyVerification(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})

	empty := filepath.Join(t.TempDir(), "known_hosts")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	g := guestConfig(s)
	g.KnownHostsFile = empty
	_, err := New(Config{VM: "vm01", Guest: g}).Hold(context.Background())
	var hk *HostKeyError
	if !errors.As(err, &hk) || hk.Known {
		t.Fatalf("unknown host: err = %v, want HostKeyError for an unknown key", err)
	}
	for _, want := range []string{"vm01", s.HostKeyFingerprint, "unknown host key"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}

	// The host is known with another key: refuse, saying so.
	other, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherPub, err := ssh.NewPublicKey(other)
	if err != nil {
		t.Fatal(err)
	}
	wrong := filepath.Join(t.TempDir(), "known_hosts")
	line := knownhosts.Line([]string{knownhosts.Normalize(s.Addr)}, otherPub)
	if err := os.WriteFile(wrong, []byte(line+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	g.KnownHostsFile = wrong
	_, err = New(Config{VM: "vm01", Guest: g}).Hold(context.Background())
	if !errors.As(err, &hk) || !hk.Known {
		t.Fatalf("changed host key: err = %v, want HostKeyError for a known host", err)
	}
	if !strings.Contains(err.Error(), s.HostKeyFingerprint) || !strings.Contains(err.Error(), "man-in-the-middle") {
		t.Errorf("error %q should name the fingerprint and the risk", err)
	}
}

func TestKeyFileReadableByOthersRefused(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	key, err := os.ReadFile(s.ClientKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	loose := filepath.Join(t.TempDir(), "id")
	if err := os.WriteFile(loose, key, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(loose, 0o644); err != nil { // regardless of umask
		t.Fatal(err)
	}
	g := guestConfig(s)
	g.KeyFile = loose
	_, err = New(Config{VM: "vm01", Guest: g}).Hold(context.Background())
	if err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("err = %v, want refusal of a group/world-readable key", err)
	}
}

// TestThawReconnectsAfterConnectionLoss drops the SSH connection while the
// guest is frozen (sshd restarts); Release must reconnect and thaw.
func TestThawReconnectsAfterConnectionLoss(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	dir := t.TempDir()
	freeze, freezeLog := freezeScript(t, dir, "exit 0")
	g := guestConfig(s)
	g.FreezeMounts = []string{"/srv/a"}
	g.FreezeCommand = freeze
	var logs bytes.Buffer
	h, err := New(Config{VM: "vm01", Guest: g, Logger: logTo(&logs)}).Hold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	s.Restart()
	rep := h.Release(context.Background())
	if rep.Err != nil {
		t.Errorf("release after reconnect: %v", rep.Err)
	}
	if got, want := readFile(t, freezeLog), "-f /srv/a\n-u /srv/a\n"; got != want {
		t.Errorf("freeze log = %q, want %q", got, want)
	}
	if !strings.Contains(logs.String(), "reconnecting") {
		t.Errorf("thaw did not go through the reconnect path; log:\n%s", logs.String())
	}
}

func TestCancelDuringBeforeSnapshot(t *testing.T) {
	s := testsshd.Start(t, testsshd.Options{})
	dir := t.TempDir()
	started := filepath.Join(dir, "started")
	marker := filepath.Join(dir, "after-ran")
	g := guestConfig(s)
	pids := filepath.Join(dir, "pids")
	killRecorded(t, pids)
	g.BeforeSnapshot = []string{"echo $$ > " + pids + "; sleep 30 & echo $! >> " + pids + "; touch " + started + "; wait"}
	g.AfterSnapshot = []string{"touch " + marker}
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	// Cancel once the command really runs (not while the guest's shell
	// is still starting), as Ctrl-C during a slow command would.
	var cancelled time.Time
	go func() {
		for {
			if _, err := os.Stat(started); err == nil {
				cancelled = time.Now()
				cancel(context.Canceled)
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	_, err := New(Config{VM: "vm01", Guest: g}).Hold(ctx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want cancellation", err)
	}
	if took := time.Since(cancelled); took > 10*time.Second {
		t.Errorf("Hold returned %v after its context was cancelled", took)
	}
	// Clean-up still runs, with its own context.
	if _, err := os.Stat(marker); err != nil {
		t.Errorf("after-snapshot command did not run after cancellation: %v", err)
	}
}
