package local

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vmvault/backend"
)

// PutDeferred objects stay invisible until Sync, then appear whole; a
// name written twice in one batch, or already present, is not an error
// of Sync, and no temporary file is left behind.
func TestPutDeferredSync(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	b, err := Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	a, c := []byte("object a"), []byte("object c")
	if err := b.Put(ctx, "data/aa/c", c); err != nil {
		t.Fatal(err)
	}
	if err := b.PutDeferred(ctx, "data/aa/c", c); !errors.Is(err, backend.ErrExist) {
		t.Fatalf("deferred put over an existing object: %v", err)
	}
	for range 2 {
		if err := b.PutDeferred(ctx, "data/aa/a", a); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Get(ctx, "data/aa/a", 0, -1); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("deferred object visible before Sync: %v", err)
	}
	if err := b.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := b.Get(ctx, "data/aa/a", 0, -1)
	if err != nil || !bytes.Equal(got, a) {
		t.Fatalf("after Sync: %q, %v", got, err)
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "data/aa"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			t.Fatalf("temporary file %s left behind", e.Name())
		}
	}
	if len(entries) != 2 {
		t.Fatalf("%d files in data/aa, want 2", len(entries))
	}
	if err := b.Sync(ctx); err != nil {
		t.Fatalf("empty Sync: %v", err)
	}
}
