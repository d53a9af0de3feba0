package repo

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

// Lock timing. A lock is refreshed every LockRefresh while held and is
// stale when it has not been refreshed for LockStale (or, on the same
// host, when its process no longer exists).
const (
	LockRefresh = 5 * time.Minute
	LockStale   = 30 * time.Minute
)

// ErrLocked means another process holds a conflicting lock.
var ErrLocked = errors.New("repository is locked")

// LockInfo is the content of a lock object.
type LockInfo struct {
	Name      string    `json:"-"`
	Exclusive bool      `json:"exclusive"`
	Command   string    `json:"command"`
	Host      string    `json:"host"`
	PID       int       `json:"pid"`
	Started   time.Time `json:"started"`
	Refreshed time.Time `json:"refreshed"`
}

func (l LockInfo) String() string {
	kind := "shared"
	if l.Exclusive {
		kind = "exclusive"
	}
	return fmt.Sprintf("%s lock by %q on host %s (PID %d) since %s", kind, l.Command, l.Host, l.PID, l.Started.Local().Format(time.RFC3339))
}

// Stale reports whether the lock's holder is gone.
func (l LockInfo) Stale(now time.Time) bool {
	if now.Sub(l.Refreshed) > LockStale {
		return true
	}
	if host, _ := os.Hostname(); host == l.Host && l.PID > 0 {
		if err := syscall.Kill(l.PID, 0); errors.Is(err, syscall.ESRCH) {
			return true
		}
	}
	return false
}

// releasedSuffix marks a lock released where it could not be deleted
// (append-only accounts): "locks/<id>.released".
const releasedSuffix = ".released"

// Lock is a held repository lock.
type Lock struct {
	r    *Repository
	mu   sync.Mutex
	info LockInfo
	stop chan struct{}
	done chan struct{}
}

// Locks returns the repository's current (unreleased) locks.
func (r *Repository) Locks(ctx context.Context) ([]LockInfo, error) {
	var names []string
	released := map[string]bool{}
	err := r.be.List(ctx, "locks/", func(o backend.ObjectInfo) error {
		if n, ok := strings.CutSuffix(o.Name, releasedSuffix); ok {
			released[n] = true
		} else {
			names = append(names, o.Name)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var out []LockInfo
	for _, n := range names {
		if released[n] {
			continue
		}
		sealed, err := getBounded(ctx, r.be, n, maxSmallObject)
		if errors.Is(err, backend.ErrNotExist) {
			continue // released meanwhile
		}
		if errors.Is(err, ErrTooLarge) {
			sealed, err = nil, nil // unreadable, below
		}
		if err != nil {
			return nil, err
		}
		raw, err := r.codec.open(TypeLock, n, sealed)
		if err != nil {
			// An unreadable lock counts as held until it is stale by age
			// (unknown holder): refuse rather than risk deleting data.
			out = append(out, LockInfo{Name: n, Exclusive: true, Command: "unreadable lock", Refreshed: time.Now()})
			continue
		}
		var li LockInfo
		if err := json.Unmarshal(raw, &li); err != nil {
			continue
		}
		li.Name = n
		out = append(out, li)
	}
	return out, nil
}

// Lock takes a shared (backup, restore, check) or exclusive (prune) lock,
// waiting up to wait for a conflicting lock to go away.
func (r *Repository) Lock(ctx context.Context, exclusive bool, command string, wait time.Duration) (*Lock, error) {
	host, _ := os.Hostname()
	now := time.Now().UTC()
	l := &Lock{r: r, info: LockInfo{Exclusive: exclusive, Command: command, Host: host, PID: os.Getpid(), Started: now, Refreshed: now}}
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
	l.stop = make(chan struct{})
	l.done = make(chan struct{})
	go l.refreshLoop()
	return l, nil
}

func (l *Lock) conflict(ctx context.Context) error {
	locks, err := l.r.Locks(ctx)
	if err != nil {
		return err
	}
	now := time.Now()
	for _, o := range locks {
		if o.Name == l.info.Name || o.Stale(now) {
			continue
		}
		if l.info.Exclusive || o.Exclusive {
			return fmt.Errorf("%w: %s", ErrLocked, o)
		}
	}
	return nil
}

func (l *Lock) try(ctx context.Context) error {
	if err := l.conflict(ctx); err != nil {
		return err
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

func (l *Lock) write(ctx context.Context) error {
	raw, err := json.Marshal(l.info)
	if err != nil {
		return err
	}
	name := lockName(randomID())
	if err := l.r.be.Put(ctx, name, l.r.codec.seal(TypeLock, name, raw)); err != nil {
		return fmt.Errorf("write lock: %w", err)
	}
	l.info.Name = name
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
	t := time.NewTicker(LockRefresh)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			l.mu.Lock()
			old := l.info.Name
			l.info.Refreshed = time.Now().UTC()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			if err := l.write(ctx); err != nil {
				l.r.log.Warn("refreshing repository lock failed", "err", err)
				l.info.Name = old
			} else if err := l.release(ctx, old); err != nil {
				l.r.log.Warn("removing old lock failed", "err", err)
			}
			cancel()
			l.mu.Unlock()
		}
	}
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
	l.mu.Lock()
	defer l.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return l.release(ctx, l.info.Name)
}

// RemoveLocks deletes stale locks (all locks if all is set) and returns
// how many it removed.
func (r *Repository) RemoveLocks(ctx context.Context, all bool) (int, error) {
	locks, err := r.Locks(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	now := time.Now()
	for _, l := range locks {
		if !all && !l.Stale(now) {
			continue
		}
		if err := r.be.Delete(ctx, l.Name); err != nil && !errors.Is(err, backend.ErrNotExist) {
			return n, err
		}
		n++
	}
	// Released markers and their locks are leftovers of append-only clients.
	var marks []string
	err = r.be.List(ctx, "locks/", func(o backend.ObjectInfo) error {
		if base, ok := strings.CutSuffix(o.Name, releasedSuffix); ok {
			marks = append(marks, base, o.Name)
		}
		return nil
	})
	if err != nil {
		return n, err
	}
	for _, m := range marks {
		if err := r.be.Delete(ctx, m); err != nil && !errors.Is(err, backend.ErrNotExist) {
			return n, err
		}
	}
	return n, nil
}
