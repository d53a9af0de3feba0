// Package limit caps the bandwidth a backup or restore takes: a token
// bucket per direction wrapped around a backend (uploads, downloads), and
// the same bucket for reading disk images, so a backup is gentle on the
// guest's storage and on the link to the repository.
//
// Rules the code keeps:
//   - A limit is in bytes per second, averaged: a caller waits before
//     (uploads, reads) or after (downloads, whose size is known only then)
//     each transfer for as long as the bucket needs to refill, so over any
//     few seconds no more than the limit passes. A single transfer is not
//     slowed down byte by byte.
//   - The bucket holds at most one second of tokens: an idle period does
//     not allow a burst longer than that.
//   - Waiting ends early, with the context's error, when the context is
//     cancelled: a limit never delays an interruption.
//   - A zero or negative limit means no limit: Wrap returns the backend
//     itself and NewBucket returns nil, whose Wait returns at once.
//   - The wrapper passes on what the wrapped backend offers beyond the
//     Backend interface (the local backend's batched durability and its
//     temporary-file cleanup), so a limit changes only the speed.
package limit

import (
	"context"
	"sync"
	"time"

	"vmvault/backend"
)

// Bucket is a token bucket of bytes. It is safe for concurrent use; a nil
// Bucket is unlimited.
type Bucket struct {
	mu     sync.Mutex
	rate   float64 // bytes per second
	tokens float64 // may go negative: a debt later callers wait out
	last   time.Time
}

// NewBucket returns a bucket of bytesPerSecond, or nil (no limit) if it
// is not positive.
func NewBucket(bytesPerSecond int64) *Bucket {
	if bytesPerSecond <= 0 {
		return nil
	}
	return &Bucket{rate: float64(bytesPerSecond), tokens: float64(bytesPerSecond), last: time.Now()}
}

// Wait takes n bytes from the bucket, sleeping until they are covered.
func (b *Bucket) Wait(ctx context.Context, n int) error {
	if b == nil || n <= 0 {
		return ctx.Err()
	}
	b.mu.Lock()
	now := time.Now()
	b.tokens = min(b.rate, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	b.tokens -= float64(n)
	var wait time.Duration
	if b.tokens < 0 {
		wait = time.Duration(-b.tokens / b.rate * float64(time.Second))
	}
	b.mu.Unlock()
	if wait == 0 {
		return ctx.Err()
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Backend limits the bytes of Put (upload) and Get (download).
type Backend struct {
	backend.Backend
	up, down *Bucket
}

// Wrap returns be with uploads limited to upload and downloads to
// download bytes per second (zero: unlimited), or be itself if neither is
// limited.
func Wrap(be backend.Backend, upload, download int64) backend.Backend {
	if upload <= 0 && download <= 0 {
		return be
	}
	lb := &Backend{Backend: be, up: NewBucket(upload), down: NewBucket(download)}
	if l, ok := be.(localStore); ok {
		return &localBackend{Backend: lb, local: l}
	}
	return lb
}

// Put implements backend.Backend.
func (b *Backend) Put(ctx context.Context, name string, data []byte) error {
	if err := b.up.Wait(ctx, len(data)); err != nil {
		return err
	}
	return b.Backend.Put(ctx, name, data)
}

// Get implements backend.Backend.
func (b *Backend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	data, err := b.Backend.Get(ctx, name, off, length)
	if err != nil {
		return nil, err
	}
	if err := b.down.Wait(ctx, len(data)); err != nil {
		return nil, err
	}
	return data, nil
}

// GetAll implements backend.Backend.
func (b *Backend) GetAll(ctx context.Context, name string, limit int64) ([]byte, error) {
	data, err := b.Backend.GetAll(ctx, name, limit)
	if err != nil {
		return nil, err
	}
	if err := b.down.Wait(ctx, len(data)); err != nil {
		return nil, err
	}
	return data, nil
}

// GetInto implements backend.IntoGetter, paying for the bytes read.
func (b *Backend) GetInto(ctx context.Context, name string, buf []byte) (int, error) {
	n, err := backend.GetInto(ctx, b.Backend, name, buf)
	if err != nil {
		return 0, err
	}
	if err := b.down.Wait(ctx, n); err != nil {
		return 0, err
	}
	return n, nil
}

// localStore is what the local backend offers beyond backend.Backend.
type localStore interface {
	PutDeferred(ctx context.Context, name string, data []byte) error
	Sync(ctx context.Context) error
	RemoveTemporary(ctx context.Context, before time.Time) (int, error)
}

// localBackend is a limited local backend that keeps its extra methods.
type localBackend struct {
	*Backend
	local localStore
}

// PutDeferred is the local backend's PutDeferred, limited like Put.
func (b *localBackend) PutDeferred(ctx context.Context, name string, data []byte) error {
	if err := b.up.Wait(ctx, len(data)); err != nil {
		return err
	}
	return b.local.PutDeferred(ctx, name, data)
}

// Sync is the local backend's Sync.
func (b *localBackend) Sync(ctx context.Context) error { return b.local.Sync(ctx) }

// RemoveTemporary is the local backend's RemoveTemporary.
func (b *localBackend) RemoveTemporary(ctx context.Context, before time.Time) (int, error) {
	return b.local.RemoveTemporary(ctx, before)
}
