package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// blockwrite changes the share of blocks it says, and the same seed
// changes the same blocks.
func TestWrite(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	for _, p := range []string{a, b} {
		if err := os.WriteFile(p, make([]byte, 1000*block), 0o600); err != nil {
			t.Fatal(err)
		}
		n, err := write(p, 5, 3)
		if err != nil || n != 50 {
			t.Fatalf("wrote %d blocks, %v; want 50", n, err)
		}
	}
	da, _ := os.ReadFile(a)
	db, _ := os.ReadFile(b)
	if !bytes.Equal(da, db) {
		t.Fatal("same seed, different writes")
	}
	changed := 0
	for i := 0; i < len(da); i += block {
		if !bytes.Equal(da[i:i+block], make([]byte, block)) {
			changed++
		}
	}
	if changed != 50 {
		t.Fatalf("%d blocks changed, want 50", changed)
	}
}
