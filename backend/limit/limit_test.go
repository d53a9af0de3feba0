package limit

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"vmvault/backend"
	"vmvault/backend/local"
)

// A bucket lets its rate through at once (one second's worth), then makes
// the caller wait for the rest; a cancelled wait ends with the context's
// error. (A lower bound on time: load on the machine cannot make it fail.)
func TestBucket(t *testing.T) {
	ctx := context.Background()
	b := NewBucket(1 << 20)
	if err := b.Wait(ctx, 1<<20); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := b.Wait(ctx, 512<<10); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("512 KiB over a drained 1 MiB/s bucket took %v", d)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := b.Wait(cctx, 100<<20); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}
	if NewBucket(0) != nil || (*Bucket)(nil).Wait(ctx, 1<<30) != nil {
		t.Fatal("a zero limit is not unlimited")
	}
}

// The wrapper limits a real local backend and keeps its batched
// durability and temporary-file cleanup; without limits it is not there.
func TestWrapLocal(t *testing.T) {
	ctx := context.Background()
	lb, err := local.Create(filepath.Join(t.TempDir(), "repo"))
	if err != nil {
		t.Fatal(err)
	}
	if Wrap(lb, 0, 0) != lb {
		t.Fatal("no limit still wrapped")
	}
	be := Wrap(lb, 1<<20, 1<<20)
	ls, ok := be.(localStore)
	if !ok {
		t.Fatal("limited local backend lost PutDeferred/Sync/RemoveTemporary")
	}
	data := bytes.Repeat([]byte("x"), 768<<10)
	start := time.Now()
	if err := be.Put(ctx, "data/00/a", data); err != nil {
		t.Fatal(err)
	}
	if err := ls.PutDeferred(ctx, "data/00/b", data); err != nil {
		t.Fatal(err)
	}
	if err := ls.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("1.5 MiB uploaded at 1 MiB/s in %v", d)
	}
	start = time.Now()
	for _, n := range []string{"data/00/a", "data/00/b"} {
		got, err := be.Get(ctx, n, 0, -1)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("get %s: %v", n, err)
		}
		if got, err = be.GetAll(ctx, n, 1<<20); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("get all %s: %v", n, err)
		}
		buf := make([]byte, 1<<20)
		if k, err := backend.GetInto(ctx, be, n, buf); err != nil || !bytes.Equal(buf[:k], data) {
			t.Fatalf("get into %s: %v", n, err)
		}
	}
	// 4.5 MiB down at 1 MiB/s, one second's worth at once: ≥ 3.5 s.
	if d := time.Since(start); d < 3*time.Second {
		t.Fatalf("4.5 MiB downloaded at 1 MiB/s in %v", d)
	}
}
