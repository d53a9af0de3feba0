// Package quiesce makes a VM's guest consistent for the instant of a
// snapshot: it runs preparation commands and sync in the guest over SSH,
// locks each database with FLUSH TABLES WITH READ LOCK on a dedicated
// connection, and freezes the guest's file systems; then it undoes all of
// that, in reverse order, as soon as the snapshots exist.
//
// The order matters: the databases flush their tables while the guest's
// file systems are still writable, and only then are those file systems
// frozen. Release thaws before unlocking for the same reason.
package quiesce

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Config describes what to quiesce for one VM.
type Config struct {
	// VM names the VM in logs and errors.
	VM string
	// Guest, if not nil, is reached over SSH for commands, sync and
	// fsfreeze.
	Guest *GuestConfig
	// Databases are locked in order.
	Databases []Database
	// Logger receives progress and warnings; nil discards them.
	Logger *slog.Logger
	// ConnectTimeout bounds connecting to each database; default 10s.
	ConnectTimeout time.Duration
	// LockTimeout bounds the wait for FLUSH TABLES WITH READ LOCK, which
	// queues behind long-running statements; default 30s.
	LockTimeout time.Duration
	// MaxHold is the longest the guest stays frozen and the databases
	// locked: if Release has not been called by then, everything is
	// released anyway and the Report says Expired. Default 2 minutes.
	MaxHold time.Duration
	// ReleaseTimeout bounds each unlock step of Release; default 30s.
	ReleaseTimeout time.Duration
}

// Defaults for Config's zero values.
const (
	defaultDBConnectTimeout = 10 * time.Second
	defaultLockTimeout      = 30 * time.Second
	defaultMaxHold          = 2 * time.Minute
	defaultReleaseTimeout   = 30 * time.Second
	unlockTablesDefault     = "UNLOCK TABLES"
)

// Quiescer quiesces one VM. It holds no connections between Holds.
type Quiescer struct {
	cfg Config
	log *slog.Logger
	// unlockSQL is "UNLOCK TABLES"; tests replace it with a statement that
	// fails, to prove a failed unlock still releases the lock.
	unlockSQL string
}

// New returns a Quiescer for cfg, with defaults filled in.
func New(cfg Config) *Quiescer {
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = defaultDBConnectTimeout
	}
	if cfg.LockTimeout <= 0 {
		cfg.LockTimeout = defaultLockTimeout
	}
	if cfg.MaxHold <= 0 {
		cfg.MaxHold = defaultMaxHold
	}
	if cfg.ReleaseTimeout <= 0 {
		cfg.ReleaseTimeout = defaultReleaseTimeout
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Quiescer{cfg: cfg, log: log.With("vm", cfg.VM), unlockSQL: unlockTablesDefault}
}

// Report is the outcome of one Hold and its Release, for logs and the
// manifest.
type Report struct {
	VM string `json:"vm"`
	// Synced is true when BeforeSnapshot commands and sync succeeded.
	Synced bool `json:"synced"`
	// Frozen lists the mount points that were frozen.
	Frozen []string `json:"frozen,omitempty"`
	// Databases has one outcome per configured database.
	Databases []DBOutcome `json:"databases,omitempty"`
	// Held is the time from the first lock or freeze to the end of the
	// last unlock or thaw: how long the guest's writers were blocked.
	Held time.Duration `json:"held_ns"`
	// Expired is true when MaxHold ran out and the hold was released
	// before the caller's Release: snapshots taken after that instant are
	// not quiesced.
	Expired bool `json:"expired,omitempty"`
	// Err collects failures while releasing (a thaw, an unlock, an
	// AfterSnapshot command). The snapshots are still consistent, but the
	// guest may need attention.
	Err error `json:"-"`
}

// Hold is a quiesced VM. Call Release as soon as the snapshots exist, and
// treat the snapshots as not quiesced if the Report says Expired.
type Hold struct {
	q        *Quiescer
	guest    *guest
	after    bool // AfterSnapshot commands must run
	locks    []*dbLock
	frozen   []string
	lastSoft bool // last frozen mount's freeze failed; its thaw may fail
	locked   time.Time
	report   Report
	watchdog *time.Timer

	mu       sync.Mutex
	released bool
}

// Hold quiesces the VM: BeforeSnapshot commands and sync in the guest,
// then FLUSH TABLES WITH READ LOCK on each database, then fsfreeze of each
// configured mount point. If any step fails, everything done so far is
// undone before Hold returns the error. A database that is down is only a
// warning unless it is Required.
func (q *Quiescer) Hold(ctx context.Context) (*Hold, error) {
	h := &Hold{q: q, report: Report{VM: q.cfg.VM}}
	fail := func(err error) (*Hold, error) {
		rep := h.release(ctx, releasedByCaller)
		if rep.Err != nil {
			return nil, errors.Join(err, fmt.Errorf("while undoing: %w", rep.Err))
		}
		return nil, err
	}

	if q.cfg.Guest != nil {
		g, err := dialGuest(ctx, q.cfg.VM, *q.cfg.Guest, q.log)
		if err != nil {
			return nil, err
		}
		h.guest = g
		started, err := g.prepare(ctx)
		h.after = started
		if err != nil {
			return fail(err)
		}
		h.report.Synced = true
	}

	opts := dbOptions{connectTimeout: q.cfg.ConnectTimeout, lockTimeout: q.cfg.LockTimeout}
	for _, d := range q.cfg.Databases {
		l, out, err := lockDatabase(ctx, q.cfg.VM, d, opts, q.log)
		h.report.Databases = append(h.report.Databases, out)
		if err != nil {
			return fail(err)
		}
		if l != nil {
			h.markLocked()
			h.locks = append(h.locks, l)
		}
	}

	if h.guest != nil && len(h.guest.cfg.FreezeMounts) > 0 {
		h.markLocked()
		toThaw, err := h.guest.freeze(ctx)
		h.frozen = toThaw
		if err != nil {
			h.lastSoft = true
			return fail(err)
		}
		h.report.Frozen = append([]string(nil), toThaw...)
	}

	q.log.Info("quiesced", "databases_locked", len(h.locks), "frozen", h.report.Frozen)
	h.mu.Lock()
	h.watchdog = time.AfterFunc(q.cfg.MaxHold, func() {
		q.log.Error("quiesce held longer than MaxHold; releasing now, snapshots taken later are not consistent", "max_hold", q.cfg.MaxHold)
		h.release(context.Background(), releasedByWatchdog)
	})
	h.mu.Unlock()
	return h, nil
}

func (h *Hold) markLocked() {
	if h.locked.IsZero() {
		h.locked = time.Now()
	}
}

// Release thaws the guest, unlocks and closes every database connection,
// runs the AfterSnapshot commands and closes the SSH connection. It uses
// its own timeouts rather than ctx's cancellation, so it also cleans up
// after an interrupted backup. It is safe to call more than once and from
// several goroutines (a defer and a signal handler); every call returns
// the same Report.
func (h *Hold) Release(ctx context.Context) Report {
	return h.release(ctx, releasedByCaller)
}

// releaseCause says who releases a hold: the caller in time, or the
// watchdog after MaxHold (the Report then says Expired).
type releaseCause bool

const (
	releasedByCaller   releaseCause = false
	releasedByWatchdog releaseCause = true
)

func (h *Hold) release(ctx context.Context, cause releaseCause) Report {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.released {
		return h.report
	}
	h.released = true
	if h.watchdog != nil {
		h.watchdog.Stop()
	}
	ctx = context.WithoutCancel(ctx)
	var errs []error

	// Thaw first: the databases may need to write while unlocking.
	if h.guest != nil && len(h.frozen) > 0 {
		if err := h.guest.thaw(ctx, h.frozen, h.lastSoft); err != nil {
			errs = append(errs, err)
		}
	}
	for i := len(h.locks) - 1; i >= 0; i-- {
		rctx, cancel := context.WithTimeout(ctx, h.q.cfg.ReleaseTimeout)
		err := h.locks[i].release(rctx, h.q.unlockSQL)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("VM %s: %w", h.q.cfg.VM, err))
		}
	}
	if !h.locked.IsZero() {
		h.report.Held = time.Since(h.locked)
	}
	if h.guest != nil {
		if h.after {
			if err := h.guest.finish(ctx); err != nil {
				errs = append(errs, err)
			}
		}
		h.guest.closeClient()
	}
	h.report.Expired = cause == releasedByWatchdog
	h.report.Err = errors.Join(errs...)
	attrs := []any{"held", h.report.Held.Round(time.Millisecond), "expired", h.report.Expired}
	if h.report.Err != nil {
		h.q.log.Error("released with errors", append(attrs, "err", h.report.Err)...)
	} else if !h.locked.IsZero() {
		h.q.log.Info("released", attrs...)
	}
	return h.report
}
