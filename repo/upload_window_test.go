package repo

import (
	"context"
	"io"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"vmvault/backend"
	"vmvault/backend/local"
)

// holdBackend, once hold is set, holds every Put until release is
// closed, and records the most memory (buffer capacity, which is what the
// objects keep live) that the Puts held at once.
type holdBackend struct {
	backend.Backend
	hold    atomic.Bool
	release chan struct{}
	arrived chan struct{} // one send per Put, without blocking

	mu      sync.Mutex
	held    int64
	maxHeld int64
}

func (b *holdBackend) Put(ctx context.Context, name string, data []byte) error {
	if !b.hold.Load() {
		return b.Backend.Put(ctx, name, data)
	}
	b.mu.Lock()
	b.held += int64(cap(data))
	b.maxHeld = max(b.maxHeld, b.held)
	b.mu.Unlock()
	select {
	case b.arrived <- struct{}{}:
	default:
	}
	<-b.release
	err := b.Backend.Put(ctx, name, data)
	b.mu.Lock()
	b.held -= int64(cap(data))
	b.mu.Unlock()
	return err
}

// A backup's window of objects waiting for upload bounds their memory:
// it counted their lengths while each sealed object of 256 KiB or more
// sits in a buffer rounded up to whole MiB (up to four times its length),
// so against a backend slower than the backup (SFTP, S3) the waiting
// objects held more than the window: 70 MB against 32 MiB here before
// the fix.
func TestBackupUploadWindowBoundsMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("backs up 96 MiB")
	}
	ctx := context.Background()
	lb, err := local.Create(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	hb := &holdBackend{Backend: lb, release: make(chan struct{}), arrived: make(chan struct{}, 1)}
	r, err := Init(ctx, hb, []byte("secret"), Options{KDF: fastKDF, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// Release the Puts once none has arrived for a while: the backup
	// waits for its window. (Released early on a slow machine, the test
	// can only pass, never fail, wrongly.)
	hb.hold.Store(true)
	go func() {
		for {
			select {
			case <-hb.arrived:
			case <-time.After(time.Second):
				close(hb.release)
				return
			}
		}
	}()
	const size = 96 << 20
	img := io.LimitReader(rand.NewChaCha8([32]byte{3}), size)
	if _, err := r.Backup(ctx, BackupRequest{VM: "vm01", Disks: []DiskSource{{Name: "disk", Source: "test", Reader: img, Size: size}}}); err != nil {
		t.Fatal(err)
	}
	t.Logf("uploads held at most %d bytes of buffers (window %d)", hb.maxHeld, uploadWindow)
	// One object may go past the window's end.
	if hb.maxHeld > uploadWindow+9<<20 {
		t.Fatalf("uploads held %d bytes of buffers at once, over the %d-byte window", hb.maxHeld, uploadWindow)
	}
}
