// Package retry wraps a backend so that transient failures (a dropped
// connection, a timeout) are retried with exponential backoff, after
// reconnecting when the backend can.
//
// Only errors known to be transient are retried: a wrong object name, a
// missing or existing object, a refused operation, a permission problem
// or a cancelled context is returned at once.
package retry

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"syscall"
	"time"

	"vmvault/backend"
)

// Reconnecter is implemented by backends that can replace broken
// connections (the sftp backend does).
type Reconnecter interface {
	Reconnect(ctx context.Context) error
}

// Options tunes the retries. Zero values take the defaults.
type Options struct {
	// Attempts is the total number of tries per operation (default 6).
	Attempts int
	// InitialDelay is the wait before the second try (default 250 ms);
	// it doubles each time up to MaxDelay (default 15 s).
	InitialDelay time.Duration
	MaxDelay     time.Duration
	// Logger receives one warning per retry; nil means slog.Default().
	Logger *slog.Logger
}

// Backend is the retrying wrapper returned by New.
type Backend struct {
	inner backend.Backend
	opts  Options
	log   *slog.Logger
}

// New wraps b.
func New(b backend.Backend, opts Options) *Backend {
	if opts.Attempts <= 0 {
		opts.Attempts = 6
	}
	if opts.InitialDelay <= 0 {
		opts.InitialDelay = 250 * time.Millisecond
	}
	if opts.MaxDelay <= 0 {
		opts.MaxDelay = 15 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Backend{inner: b, opts: opts, log: log.With("repository", b.Location())}
}

// Transient reports whether err is worth retrying: it says so itself
// (a Transient() bool method anywhere in its chain), or it is a network
// timeout, a reset or refused connection, or an unexpected end of stream.
// Backend sentinels and context errors are never transient.
func Transient(err error) bool {
	if err == nil ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, backend.ErrNotExist) || errors.Is(err, backend.ErrExist) ||
		errors.Is(err, backend.ErrReadOnly) || errors.Is(err, backend.ErrRetained) ||
		errors.Is(err, os.ErrPermission) {
		return false
	}
	var t interface{ Transient() bool }
	if errors.As(err, &t) {
		return t.Transient()
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ETIMEDOUT) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH)
}

// do runs op until it succeeds, fails permanently, or runs out of tries.
func (b *Backend) do(ctx context.Context, what, name string, op func() error) error {
	delay := b.opts.InitialDelay
	for attempt := 1; ; attempt++ {
		err := op()
		if err == nil || !Transient(err) || attempt >= b.opts.Attempts || ctx.Err() != nil {
			return err
		}
		b.log.Warn("backend operation failed, retrying",
			"op", what, "object", name, "attempt", attempt, "max_attempts", b.opts.Attempts, "delay", delay, "err", err)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		delay = min(2*delay, b.opts.MaxDelay)
		if rc, ok := b.inner.(Reconnecter); ok {
			if rerr := rc.Reconnect(ctx); rerr != nil {
				if !Transient(rerr) {
					return errors.Join(err, rerr)
				}
				// The server may still be coming back: count this
				// as the attempt and wait again.
				b.log.Warn("reconnect failed", "err", rerr)
			}
		}
	}
}

// Put stores data. After a dropped connection the retried Put may find
// the object it had itself completed and report ErrExist; objects are
// content-addressed, so callers treat that as success where it matters.
func (b *Backend) Put(ctx context.Context, name string, data []byte) error {
	return b.do(ctx, "put", name, func() error { return b.inner.Put(ctx, name, data) })
}

// Get reads part or all of an object.
func (b *Backend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	var out []byte
	err := b.do(ctx, "get", name, func() error {
		var err error
		out, err = b.inner.Get(ctx, name, off, length)
		return err
	})
	return out, err
}

// GetAll reads a whole object; ErrTooLarge is final, not retried.
func (b *Backend) GetAll(ctx context.Context, name string, limit int64) ([]byte, error) {
	var out []byte
	err := b.do(ctx, "get", name, func() error {
		var err error
		out, err = b.inner.GetAll(ctx, name, limit)
		return err
	})
	return out, err
}

// GetInto reads a whole object into buf (backend.IntoGetter);
// ErrTooLarge is final, not retried.
func (b *Backend) GetInto(ctx context.Context, name string, buf []byte) (int, error) {
	var n int
	err := b.do(ctx, "get", name, func() error {
		var err error
		n, err = backend.GetInto(ctx, b.inner, name, buf)
		return err
	})
	return n, err
}

// Stat returns an object's size.
func (b *Backend) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	var out backend.ObjectInfo
	err := b.do(ctx, "stat", name, func() error {
		var err error
		out, err = b.inner.Stat(ctx, name)
		return err
	})
	return out, err
}

// List lists objects under prefix. A listing that fails part-way is
// restarted, so fn may see some objects twice; an error from fn itself
// is never retried.
func (b *Backend) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	var fnErr error
	err := b.do(ctx, "list", prefix, func() error {
		err := b.inner.List(ctx, prefix, func(oi backend.ObjectInfo) error {
			if err := fn(oi); err != nil {
				fnErr = err
				return err
			}
			return nil
		})
		if fnErr != nil {
			return permanent{fnErr}
		}
		return err
	})
	if fnErr != nil {
		return fnErr
	}
	return err
}

// permanent stops retries of an error that merely looks transient.
type permanent struct{ err error }

func (p permanent) Error() string   { return p.err.Error() }
func (p permanent) Unwrap() error   { return p.err }
func (p permanent) Transient() bool { return false }

// Delete removes an object. A retried Delete whose first try succeeded
// before the connection dropped reports ErrNotExist.
func (b *Backend) Delete(ctx context.Context, name string) error {
	return b.do(ctx, "delete", name, func() error { return b.inner.Delete(ctx, name) })
}

// Location returns the wrapped backend's location.
func (b *Backend) Location() string { return b.inner.Location() }

// Close closes the wrapped backend.
func (b *Backend) Close() error { return b.inner.Close() }

// Unwrap returns the wrapped backend, so that a caller can reach an
// optional interface of the store beneath: the wrapper itself implements
// only backend.Backend. (The local backend, whose RemoveTemporary prune
// looks for, is never wrapped: it has no transient failures.)
func (b *Backend) Unwrap() backend.Backend { return b.inner }

var _ backend.Backend = (*Backend)(nil)
