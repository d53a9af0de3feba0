package repo

// Locks are leases.
//
// A lock object (locks/<id>) names its holder: host, boot ID
// (/proc/sys/kernel/random/boot_id), PID namespace (the inode of
// /proc/self/ns/pid) and PID. The rules every process keeps:
//
//  1. Provably dead: a lock is dead at once only when host, boot ID and
//     PID namespace all equal the caller's and the PID no longer exists.
//     A PID means nothing in another namespace (a container), after a
//     reboot or on another host of the same name.
//  2. Any other lock is alive until it has not been rewritten for
//     LockStale, judged by the store's clock: the object's ModTime
//     (file mtime on local and SFTP) against the store's "now", which a
//     process learns from the ModTime of a lock object it has just
//     written. Client clocks and the times written into the lock are
//     informational only. A lock dated more than LockRefresh after the
//     store's now cannot have been written by the store: it is ignored.
//     A lock object that does not open (junk) ages out the same way.
//  3. A holder refreshes every LockRefresh by writing a new lock object
//     and then removing the old one (or, where it may not delete, adding
//     "<old>.released"): append-only stores cannot touch an existing
//     object, so a refresh never rewrites one.
//  4. A holder whose refresh fails, or whose lock object has vanished
//     (removed as stale or by unlock --remove-all), has lost its lease:
//     its context is cancelled, and a backup checks before it commits
//     its manifest that its lease still holds (last refresh younger than
//     LockStale by its own monotonic clock, object still present). So a
//     backup that stalled past its lease never commits.
//  5. Prune never deletes an unreferenced object younger than its safety
//     margin (DefaultPruneMargin > LockStale), by the store's clock: a
//     running backup whose lock prune cannot see keeps its uploads, and
//     by rule 4 it cannot commit after the margin has passed.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"vmvault/backend"
)

// Lock timing. A lock is rewritten every LockRefresh while held and is
// stale when its object is older than LockStale by the store's clock.
const (
	LockRefresh = 5 * time.Minute
	LockStale   = 30 * time.Minute
	// leaseSlack is how long before LockStale a holder stops trusting
	// its own lease (its refresh may have reached the store late).
	leaseSlack = time.Minute
)

// ErrLocked means another process holds a conflicting lock.
var ErrLocked = errors.New("repository is locked")

// ErrLockLost means this process's lock lapsed or was removed while it
// was held (a failed refresh, a stall longer than the lease, or unlock
// --remove-all): what it was doing is abandoned, nothing is committed.
var ErrLockLost = fmt.Errorf("%w: this process lost its repository lock (refresh failed, stalled past the lease, or removed); nothing was committed", ErrLocked)

// LockMode is the kind of a repository lock.
type LockMode int

// Lock modes.
const (
	// SharedLock is for backup, restore, check and other readers: any
	// number may be held at once, not with an exclusive one.
	SharedLock LockMode = iota + 1
	// ExclusiveLock is for prune and forget: no other lock at all.
	ExclusiveLock
)

// LockInfo is the content of a lock object, and what the store says of it.
type LockInfo struct {
	Name string `json:"-"`
	// ModTime is when the store wrote the object, by its own clock.
	ModTime time.Time `json:"-"`
	// Unreadable marks an object under locks/ that does not open or parse.
	Unreadable bool `json:"-"`

	Exclusive bool   `json:"exclusive"`
	Command   string `json:"command"`
	Host      string `json:"host"`
	BootID    string `json:"boot_id,omitempty"`
	PIDNS     uint64 `json:"pid_ns,omitempty"`
	PID       int    `json:"pid"`
	// Started and Refreshed are the holder's clock: for people only.
	Started   time.Time `json:"started"`
	Refreshed time.Time `json:"refreshed"`
}

func (l LockInfo) String() string {
	if l.Unreadable {
		return fmt.Sprintf("unreadable lock object %s written %s", l.Name, l.ModTime.Local().Format(time.RFC3339))
	}
	kind := "shared"
	if l.Exclusive {
		kind = "exclusive"
	}
	return fmt.Sprintf("%s lock by %q on host %s (PID %d) since %s", kind, l.Command, l.Host, l.PID, l.Started.Local().Format(time.RFC3339))
}

// processIdentity is what makes a PID meaningful: host, boot, namespace.
type processIdentity struct {
	host   string
	bootID string
	pidNS  uint64
}

func thisProcess() processIdentity {
	var id processIdentity
	id.host, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		id.bootID = strings.TrimSpace(string(b))
	}
	if st, err := os.Stat("/proc/self/ns/pid"); err == nil {
		if s, ok := st.Sys().(*syscall.Stat_t); ok {
			id.pidNS = s.Ino
		}
	}
	return id
}

// provablyDead reports whether the lock's holder is known to be gone:
// same host, boot and PID namespace as self, and no such process.
func (l LockInfo) provablyDead(self processIdentity) bool {
	if l.Unreadable || l.PID <= 0 || l.Host != self.host || l.BootID == "" || l.BootID != self.bootID ||
		l.PIDNS == 0 || l.PIDNS != self.pidNS {
		return false
	}
	return errors.Is(syscall.Kill(l.PID, 0), syscall.ESRCH)
}

// Stale reports whether the lock no longer protects anything at storeNow
// (the store's clock): its holder is provably dead, its object is older
// than LockStale, or it is dated impossibly far in the future.
func (l LockInfo) Stale(storeNow time.Time) bool {
	return l.stale(storeNow, thisProcess())
}

func (l LockInfo) stale(storeNow time.Time, self processIdentity) bool {
	if l.provablyDead(self) {
		return true
	}
	if l.ModTime.IsZero() { // the store cannot tell: the holder's word
		return storeNow.Sub(l.Refreshed) > LockStale
	}
	age := storeNow.Sub(l.ModTime)
	return age > LockStale || age < -LockRefresh
}

// Suffixes of names under locks/ that are not locks: a released marker
// (append-only accounts cannot delete their lock) and a clock probe.
const (
	releasedSuffix = ".released"
	clockSuffix    = ".clock"
)

// storeClock maps local time to the store's: offset is store minus local,
// learnt from the ModTime of an object this process just wrote.
type storeClock struct {
	mu     sync.Mutex
	known  bool
	offset time.Duration
}

// learn records the store's ModTime of an object written between
// before and after (local clock).
func (c *storeClock) learn(mod, before, after time.Time) {
	if mod.IsZero() {
		return
	}
	mid := before.Add(after.Sub(before) / 2)
	c.mu.Lock()
	c.known, c.offset = true, mod.Sub(mid)
	c.mu.Unlock()
}

// storeNow returns the store's current time. Without a lock written by
// this process yet, it writes and removes a probe object to learn it.
func (r *Repository) storeNow(ctx context.Context) (time.Time, error) {
	r.clock.mu.Lock()
	known, off := r.clock.known, r.clock.offset
	r.clock.mu.Unlock()
	if known {
		return time.Now().Add(off), nil
	}
	name := lockName(randomID()) + clockSuffix
	before := time.Now()
	if err := r.be.Put(ctx, name, nil); err != nil {
		return time.Time{}, fmt.Errorf("probe the store's clock: %w", err)
	}
	after := time.Now()
	st, err := r.be.Stat(ctx, name)
	r.be.Delete(ctx, name) // where refused (append-only) prune removes it later
	if err != nil {
		return time.Time{}, fmt.Errorf("probe the store's clock: %w", err)
	}
	if st.ModTime.IsZero() {
		return time.Now(), nil
	}
	r.clock.learn(st.ModTime, before, after)
	return r.storeNow(ctx)
}

// Lock is a held repository lock.
type Lock struct {
	r    *Repository
	mu   sync.Mutex
	info LockInfo
	// written is when (local monotonic clock) the current lock object
	// was written: the lease runs LockStale from there.
	written time.Time
	lost    error
	ctx     context.Context
	cancel  context.CancelCauseFunc
	stop    chan struct{}
	done    chan struct{}
}

// lockObjects lists locks/: the lock objects, released markers and the
// ModTime of everything.
func (r *Repository) lockObjects(ctx context.Context) (locks []backend.ObjectInfo, other []backend.ObjectInfo, released map[string]bool, err error) {
	released = map[string]bool{}
	err = r.be.List(ctx, "locks/", func(o backend.ObjectInfo) error {
		switch {
		case strings.HasSuffix(o.Name, releasedSuffix):
			released[strings.TrimSuffix(o.Name, releasedSuffix)] = true
			other = append(other, o)
		case strings.HasSuffix(o.Name, clockSuffix):
			other = append(other, o)
		default:
			locks = append(locks, o)
		}
		return nil
	})
	return locks, other, released, err
}

// Locks returns the repository's current (unreleased) locks, stale ones
// included. An object that does not open is returned as Unreadable (and
// warned about once): it ages out by its ModTime like any lock.
func (r *Repository) Locks(ctx context.Context) ([]LockInfo, error) {
	objs, _, released, err := r.lockObjects(ctx)
	if err != nil {
		return nil, err
	}
	var out []LockInfo
	for _, o := range objs {
		if released[o.Name] {
			continue
		}
		li, err := r.readLock(ctx, o)
		if errors.Is(err, backend.ErrNotExist) {
			continue // released meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, li)
	}
	return out, nil
}

func (r *Repository) readLock(ctx context.Context, o backend.ObjectInfo) (LockInfo, error) {
	junk := LockInfo{Name: o.Name, ModTime: o.ModTime, Unreadable: true, Exclusive: true, Command: "unreadable lock"}
	if _, err := parseID(shortName(o.Name)); err != nil {
		r.warnJunk(o.Name, err)
		return junk, nil
	}
	sealed, err := getBounded(ctx, r.be, o.Name, maxSmallObject)
	if errors.Is(err, ErrTooLarge) {
		r.warnJunk(o.Name, err) // unreadable: ages out by its file time
		return junk, nil
	}
	if err != nil {
		return LockInfo{}, err
	}
	raw, err := r.codec.open(TypeLock, o.Name, sealed)
	var li LockInfo
	if err == nil {
		err = json.Unmarshal(raw, &li)
	}
	if err != nil {
		r.warnJunk(o.Name, err)
		return junk, nil
	}
	li.Name, li.ModTime = o.Name, o.ModTime
	return li, nil
}

// Lock takes a lock of the given mode, waiting up to wait for a
// conflicting lock to go away. Its Context is cancelled when the lease
// is lost.
func (r *Repository) Lock(ctx context.Context, mode LockMode, command string, wait time.Duration) (*Lock, error) {
	if mode != SharedLock && mode != ExclusiveLock {
		return nil, fmt.Errorf("lock: invalid mode %d", mode)
	}
	self := thisProcess()
	now := time.Now().UTC()
	l := &Lock{r: r, info: LockInfo{Exclusive: mode == ExclusiveLock, Command: command, Host: self.host,
		BootID: self.bootID, PIDNS: self.pidNS, PID: os.Getpid(), Started: now, Refreshed: now}}
	deadline := time.Now().Add(wait)
	for {
		err := l.try(ctx)
		if err == nil {
			break
		}
		if !errors.Is(err, ErrLocked) || time.Now().After(deadline) {
			return nil, err
		}
		r.log.Info("waiting for lock", "err", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(min(5*time.Second, time.Until(deadline)+10*time.Millisecond)):
		}
	}
	l.ctx, l.cancel = context.WithCancelCause(ctx)
	l.stop = make(chan struct{})
	l.done = make(chan struct{})
	r.holdLock(l)
	go l.refreshLoop()
	return l, nil
}

// Context is cancelled (cause ErrLockLost) when the lease is lost, and
// when the context Lock was given is.
func (l *Lock) Context() context.Context { return l.ctx }

func (l *Lock) conflict(ctx context.Context) error {
	locks, err := l.r.Locks(ctx)
	if err != nil {
		return err
	}
	now, err := l.r.storeNow(ctx)
	if err != nil {
		return err
	}
	self := thisProcess()
	for _, o := range locks {
		if o.Name == l.info.Name || o.stale(now, self) {
			continue
		}
		if l.info.Exclusive || o.Exclusive {
			return fmt.Errorf("%w: %s", ErrLocked, o)
		}
	}
	return nil
}

func (l *Lock) try(ctx context.Context) error {
	l.r.clock.mu.Lock()
	known := l.r.clock.known
	l.r.clock.mu.Unlock()
	// Without the store's clock, a look first would judge ages by ours:
	// write first, then look (the write teaches us the store's clock).
	if known {
		if err := l.conflict(ctx); err != nil {
			return err
		}
	}
	if err := l.write(ctx); err != nil {
		return err
	}
	// Two processes may have checked at the same instant; look again now
	// that ours is visible, and back off on a conflict.
	if err := l.conflict(ctx); err != nil {
		l.release(context.WithoutCancel(ctx), l.info.Name)
		l.info.Name = ""
		return err
	}
	return nil
}

// write stores a new lock object and learns the store's clock from it.
func (l *Lock) write(ctx context.Context) error {
	raw, err := json.Marshal(l.info)
	if err != nil {
		return err
	}
	name := lockName(randomID())
	before := time.Now()
	if err := l.r.be.Put(ctx, name, l.r.codec.seal(TypeLock, name, raw)); err != nil {
		return fmt.Errorf("write lock: %w", err)
	}
	after := time.Now()
	if st, err := l.r.be.Stat(ctx, name); err == nil {
		l.r.clock.learn(st.ModTime, before, after)
	}
	l.info.Name = name
	l.written = before
	return nil
}

// release removes a lock object, or marks it released where deletion is
// refused (append-only).
func (l *Lock) release(ctx context.Context, name string) error {
	err := l.r.be.Delete(ctx, name)
	if errors.Is(err, backend.ErrReadOnly) {
		mark := name + releasedSuffix
		return l.r.be.Put(ctx, mark, l.r.codec.seal(TypeLock, mark, []byte("{}")))
	}
	if errors.Is(err, backend.ErrNotExist) {
		return nil
	}
	return err
}

func (l *Lock) refreshLoop() {
	defer close(l.done)
	t := time.NewTicker(l.r.lockRefresh)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			if err := l.refresh(); err != nil {
				l.mu.Lock()
				l.lost = err
				l.mu.Unlock()
				l.r.log.Error("repository lock lost: abandoning the operation", "err", err)
				l.cancel(err)
				return
			}
		}
	}
}

// refresh replaces the lock object by a new one. The old one must still
// be there: if it is gone, someone judged it stale or removed it, and
// the lease is lost.
func (l *Lock) refresh() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	old := l.info.Name
	if time.Since(l.written) > LockStale-leaseSlack {
		return fmt.Errorf("%w: last refresh %s ago", ErrLockLost, time.Since(l.written).Round(time.Second))
	}
	if _, err := l.r.be.Stat(ctx, old); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrLockLost, old, err)
	}
	l.info.Refreshed = time.Now().UTC()
	if err := l.write(ctx); err != nil {
		l.info.Name = old
		return fmt.Errorf("%w: refresh: %w", ErrLockLost, err)
	}
	if err := l.release(ctx, old); err != nil {
		l.r.log.Warn("removing the previous lock object failed", "lock", old, "err", err)
	}
	return nil
}

// Verify reports whether the lease still holds: not lost, refreshed
// within the lease by the local monotonic clock, object still present.
// The error wraps ErrLockLost.
func (l *Lock) Verify(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lost != nil {
		return l.lost
	}
	if age := time.Since(l.written); age > LockStale-leaseSlack {
		return fmt.Errorf("%w: last refresh %s ago", ErrLockLost, age.Round(time.Second))
	}
	if _, err := l.r.be.Stat(ctx, l.info.Name); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w: %s: %w", ErrLockLost, l.info.Name, err)
	}
	return nil
}

// holdLock and dropLock track the locks this Repository holds, so that
// a commit can verify them (checkLeases).
func (r *Repository) holdLock(l *Lock) {
	r.locksMu.Lock()
	defer r.locksMu.Unlock()
	r.held = append(r.held, l)
}

func (r *Repository) dropLock(l *Lock) {
	r.locksMu.Lock()
	defer r.locksMu.Unlock()
	for i, h := range r.held {
		if h == l {
			r.held = append(r.held[:i], r.held[i+1:]...)
			return
		}
	}
}

// checkLeases verifies every lock this Repository holds (see Lock.verify).
// A backup calls it just before it commits its manifest.
func (r *Repository) checkLeases(ctx context.Context) error {
	r.locksMu.Lock()
	held := append([]*Lock(nil), r.held...)
	r.locksMu.Unlock()
	for _, l := range held {
		if err := l.Verify(ctx); err != nil {
			return err
		}
	}
	return nil
}

// Unlock releases the lock. It is safe to call more than once.
func (l *Lock) Unlock() error {
	if l == nil || l.stop == nil {
		return nil
	}
	select {
	case <-l.stop:
		return nil
	default:
	}
	close(l.stop)
	<-l.done
	l.r.dropLock(l)
	l.cancel(context.Canceled)
	l.mu.Lock()
	defer l.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return l.release(ctx, l.info.Name)
}

// LockSelection says which locks RemoveLocks removes.
type LockSelection int

// Lock selections.
const (
	// StaleLocks are locks that protect nothing any more (LockInfo.Stale),
	// released locks and their markers, and leftover clock probes.
	StaleLocks LockSelection = iota + 1
	// AllLocks is every object under locks/: only when no vmvault
	// process uses the repository.
	AllLocks
)

// staleLocks returns the names under locks/ that which selects.
func (r *Repository) staleLocks(ctx context.Context, which LockSelection) ([]string, error) {
	objs, other, released, err := r.lockObjects(ctx)
	if err != nil {
		return nil, err
	}
	now, err := r.storeNow(ctx)
	if err != nil {
		return nil, err
	}
	self := thisProcess()
	var names []string
	for _, o := range other {
		if which == AllLocks || strings.HasSuffix(o.Name, releasedSuffix) || (LockInfo{ModTime: o.ModTime}).stale(now, self) {
			names = append(names, o.Name)
		}
	}
	for _, o := range objs {
		if which == AllLocks || released[o.Name] {
			names = append(names, o.Name)
			continue
		}
		li, err := r.readLock(ctx, o)
		if errors.Is(err, backend.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if li.stale(now, self) && !r.holds(o.Name) {
			names = append(names, o.Name)
		}
	}
	return names, nil
}

// holds reports whether name is a lock object this Repository holds.
func (r *Repository) holds(name string) bool {
	r.locksMu.Lock()
	defer r.locksMu.Unlock()
	for _, l := range r.held {
		l.mu.Lock()
		mine := l.info.Name == name
		l.mu.Unlock()
		if mine {
			return true
		}
	}
	return false
}

// RemoveLocks deletes the selected objects under locks/ and returns how
// many locks it removed (a lock and its released marker count once; a
// junk object counts as one).
func (r *Repository) RemoveLocks(ctx context.Context, which LockSelection) (int, error) {
	names, err := r.staleLocks(ctx, which)
	if err != nil {
		return 0, err
	}
	set := map[string]bool{}
	for _, n := range names {
		set[n] = true
	}
	count := 0
	for _, n := range names {
		if err := r.be.Delete(ctx, n); err != nil && !errors.Is(err, backend.ErrNotExist) {
			if errors.Is(err, backend.ErrReadOnly) {
				return count, ErrAppendOnly
			}
			return count, fmt.Errorf("remove %s: %w", n, err)
		}
		base, marker := strings.CutSuffix(n, releasedSuffix)
		if !strings.HasSuffix(n, clockSuffix) && (!marker || !set[base]) {
			count++
		}
	}
	return count, nil
}
