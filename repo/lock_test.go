package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// unusedPID returns a PID no process of this namespace has.
func unusedPID(t *testing.T) int {
	for pid := 4_000_000; pid > 100_000; pid -= 7919 {
		if _, err := os.Stat(filepath.Join("/proc", itoa(pid))); os.IsNotExist(err) {
			return pid
		}
	}
	t.Skip("no unused PID found")
	return 0
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

// plantLock writes a sealed lock object with info, dated mod.
func plantLock(t *testing.T, tr *testRepo, info LockInfo, mod time.Time) string {
	t.Helper()
	raw, _ := json.Marshal(info)
	name := lockName(randomID())
	if err := tr.be.Put(context.Background(), name, tr.codec.seal(TypeLock, name, raw)); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(tr.dir, filepath.FromSlash(name))
	if err := os.Chtimes(path, mod, mod); err != nil {
		t.Fatal(err)
	}
	return name
}

// Which locks are stale: a PID is evidence only in our host, boot and
// PID namespace; everything else ages out by the store's file time.
func TestLockLeaseRules(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	self := thisProcess()
	if self.bootID == "" || self.pidNS == 0 {
		t.Skip("no boot id or PID namespace on this system")
	}
	dead := unusedPID(t)
	now := time.Now()
	cases := []struct {
		name  string
		info  LockInfo
		mod   time.Time
		stale bool
	}{
		{"dead PID here", LockInfo{Host: self.host, BootID: self.bootID, PIDNS: self.pidNS, PID: dead}, now, true},
		{"live PID here", LockInfo{Host: self.host, BootID: self.bootID, PIDNS: self.pidNS, PID: os.Getpid()}, now, false},
		{"other PID namespace", LockInfo{Host: self.host, BootID: self.bootID, PIDNS: self.pidNS + 1, PID: dead}, now, false},
		{"other boot", LockInfo{Host: self.host, BootID: "x" + self.bootID, PIDNS: self.pidNS, PID: dead}, now, false},
		{"old format, no boot id", LockInfo{Host: self.host, PID: dead}, now, false},
		{"other host", LockInfo{Host: self.host + "-other", BootID: self.bootID, PIDNS: self.pidNS, PID: dead}, now, false},
		{"other PID namespace, lease over", LockInfo{Host: self.host, PIDNS: self.pidNS + 1, PID: dead}, now.Add(-LockStale - time.Minute), true},
		// The holder's own clock says "fresh"; the store says old.
		{"forged refresh time", LockInfo{Host: "h", PID: 1, Refreshed: now.Add(24 * time.Hour)}, now.Add(-LockStale - time.Minute), true},
		{"dated in the future", LockInfo{Host: "h", PID: 1}, now.Add(365 * 24 * time.Hour), true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name := plantLock(t, tr, c.info, c.mod)
			defer tr.be.Delete(ctx, name)
			l, err := tr.Lock(ctx, ExclusiveLock, "prune", 0)
			l.Unlock()
			if c.stale && err != nil {
				t.Fatalf("stale lock blocks: %v", err)
			}
			if !c.stale && !errors.Is(err, ErrLocked) {
				t.Fatalf("live lock ignored: %v", err)
			}
			tr.RemoveLocks(ctx, AllLocks)
		})
	}
}

// Junk under locks/ blocks no one forever: it ages out by file time, is
// warned about once, and unlock counts it.
func TestJunkLocks(t *testing.T) {
	var logs bytes.Buffer
	tr := newTestRepo(t)
	tr.log = newTextLogger(&logs)
	ctx := context.Background()
	locks := filepath.Join(tr.dir, "locks")
	os.WriteFile(filepath.Join(locks, "x"), []byte("junk"), 0o600)
	if _, err := tr.Lock(ctx, SharedLock, "backup", 0); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "locks/x") {
		t.Fatalf("a fresh unreadable lock (unknown holder) must hold for a lease: %v", err)
	}
	old := time.Now().Add(-LockStale - time.Minute)
	os.Chtimes(filepath.Join(locks, "x"), old, old)
	future := time.Now().Add(10 * 365 * 24 * time.Hour)
	junk2 := filepath.Join(locks, strings.Repeat("cd", 32))
	os.WriteFile(junk2, []byte("junk with a lock's name"), 0o600)
	os.Chtimes(junk2, future, future)
	l, err := tr.Lock(ctx, ExclusiveLock, "prune", 0)
	if err != nil {
		t.Fatalf("old and future-dated junk lock blocks: %v", err)
	}
	if n, err := tr.RemoveLocks(ctx, StaleLocks); err != nil || n != 2 {
		t.Fatalf("unlock removed %d lock(s), %v; want 2", n, err)
	}
	if _, err := os.Stat(filepath.Join(tr.dir, filepath.FromSlash(l.info.Name))); err != nil {
		t.Fatal("removing stale locks removed a held one")
	}
	l.Unlock()
	if strings.Count(logs.String(), "locks/x") != 1 {
		t.Fatalf("junk warned about %d times: %s", strings.Count(logs.String(), "locks/x"), logs.String())
	}
}

// A backup whose lock vanished (unlock --remove-all, or judged stale by
// another host) does not commit; a failed refresh cancels the lock's
// context.
func TestLostLeaseCommitsNothing(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	l, err := tr.Lock(ctx, SharedLock, "backup", 0)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := tr.RemoveLocks(ctx, AllLocks); err != nil || n != 1 {
		t.Fatalf("remove-all: %d %v", n, err)
	}
	img := testImage(21, 3<<20)
	_, err = tr.Backup(l.Context(), BackupRequest{VM: "vm01", Disks: []DiskSource{{Name: "disk", Reader: bytes.NewReader(img), Size: int64(len(img))}}})
	if !errors.Is(err, ErrLockLost) {
		t.Fatalf("backup after its lock was removed: %v", err)
	}
	if ms, _ := tr.Manifests(ctx, ""); len(ms) != 0 {
		t.Fatal("a backup without its lock committed")
	}
	l.Unlock()

	tr.lockRefresh = 20 * time.Millisecond
	l, err = tr.Lock(ctx, SharedLock, "backup", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	tr.RemoveLocks(ctx, AllLocks)
	select {
	case <-l.Context().Done():
		if !errors.Is(context.Cause(l.Context()), ErrLockLost) {
			t.Fatalf("cause %v", context.Cause(l.Context()))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("losing the lock did not cancel its context")
	}
}

func newTextLogger(w *bytes.Buffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, nil))
}

// A held lock is rewritten under a new name at each refresh (nothing is
// rewritten in place, for append-only stores) and stays valid; a lease
// whose last write is older than the lease, by the holder's own clock
// (a process stopped for longer than the lease), is lost.
func TestLockRefreshAndLapse(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	tr.lockRefresh = 20 * time.Millisecond
	l, err := tr.Lock(ctx, SharedLock, "backup", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	first := l.info.Name
	waitUntil := time.Now().Add(5 * time.Second)
	for {
		l.mu.Lock()
		name := l.info.Name
		l.mu.Unlock()
		if name != first {
			break
		}
		if time.Now().After(waitUntil) {
			t.Fatal("the lock was never refreshed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := os.Stat(filepath.Join(tr.dir, filepath.FromSlash(first))); !os.IsNotExist(err) {
		t.Fatalf("the refreshed lock's old object is still there: %v", err)
	}
	if err := l.Verify(ctx); err != nil {
		t.Fatalf("a refreshed lease: %v", err)
	}

	tr.lockRefresh = LockRefresh
	l2, err := tr.Lock(ctx, SharedLock, "backup", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Unlock()
	l2.mu.Lock()
	l2.written = time.Now().Add(-LockStale)
	l2.mu.Unlock()
	if err := l2.Verify(ctx); !errors.Is(err, ErrLockLost) {
		t.Fatalf("a lapsed lease verifies: %v", err)
	}
}
