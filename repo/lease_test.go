package repo

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"vmvault/chunk"
	"vmvault/crypto"
)

// writeImageFile writes img to a new file and returns its path.
func writeImageFile(t *testing.T, img []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// openLeased opens path and takes a read lease on it, closed and given
// back when the test ends; it skips the test where this machine grants
// no lease on a file of the test's temp dir (another file system, leases
// disabled).
func openLeased(t *testing.T, path string) (*os.File, *readLease) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	l := takeReadLease(f)
	if l == nil {
		t.Skip("no read lease on a file in the test's temp dir")
	}
	t.Cleanup(l.release)
	return f, l
}

// leaseOrSkip skips a test where no read lease can be had on path.
func leaseOrSkip(t *testing.T, path string) {
	t.Helper()
	f, l := openLeased(t, path)
	l.release()
	f.Close()
}

// A file no one writes is read under a lease: its new chunks are sealed
// from the mapped bytes, without private copies, and everything restores
// and checks.
func TestBackupLeasedFileInPlace(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(21, 24<<20)
	path := writeImageFile(t, img)
	leaseOrSkip(t, path)
	before, redone := chunksSealedInPlace.Load(), inPlaceRedone.Load()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: int64(len(img))}}})
	if err != nil {
		t.Fatal(err)
	}
	if n := chunksSealedInPlace.Load() - before; n != m.Stats.ChunksNew || n == 0 {
		t.Fatalf("%d chunks sealed in place, %d new chunks: want all of them", n, m.Stats.ChunksNew)
	}
	if n := inPlaceRedone.Load() - redone; n != 0 {
		t.Fatalf("%d chunks sealed again privately, with no writer", n)
	}
	r := tr.reopen(t)
	m = mustFind(t, r, "vm", m.ID[:8])
	if got := restoreBytes(t, r, m); !bytes.Equal(got, img) {
		t.Fatal("restored image differs")
	}
	checkSegmentIDs(t, r, m)
	if rep, err := r.Check(context.Background(), CheckOptions{ReadData: true}); err != nil || !rep.OK() {
		t.Fatalf("check --read-data: %v %v", err, rep.Damage)
	}
	// The lease is given back: the file can be opened for writing at once.
	opened := make(chan error, 1)
	go func() {
		w, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err == nil {
			w.Close()
		}
		opened <- err
	}()
	select {
	case err := <-opened:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("opening the file for writing after the backup still waits for a lease")
	}
}

// A writer that opens the file during the backup breaks the lease: the
// backup releases it at once (the writer does not wait for the backup),
// reads the rest privately, and every object it stores holds the bytes
// its ID names.
func TestBackupLeaseBrokenMidBackup(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(22, 48<<20)
	path := writeImageFile(t, img)
	leaseOrSkip(t, path)
	broken := leasesBroken.Load()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var once sync.Once
	var writerErr error
	writerDone, stop := make(chan struct{}), make(chan struct{})
	progress := func(_ string, done int64) {
		if done < 8<<20 {
			return
		}
		once.Do(func() {
			opened := make(chan struct{})
			go func() { // the "guest", started while the backup reads
				defer close(writerDone)
				w, err := os.OpenFile(path, os.O_WRONLY, 0) // waits for the lease
				close(opened)
				if err != nil {
					writerErr = err
					return
				}
				defer w.Close()
				writerErr = rewriteBlocks(w, len(img), 5, stop)
			}()
			// The reader waits here, so only the lease's watcher can
			// let the writer in.
			select {
			case <-opened:
			case <-time.After(20 * time.Second):
				t.Error("the writer's open still waits for the backup's lease")
			}
		})
	}
	m, err := tr.Backup(context.Background(), BackupRequest{VM: "vm", Disks: []DiskSource{{Name: "d", Source: path, Reader: f, Size: int64(len(img))}}, Progress: progress})
	close(stop)
	<-writerDone
	if err != nil {
		t.Fatalf("backup of a file opened for writing meanwhile: %v", err)
	}
	if writerErr != nil {
		t.Fatal(writerErr)
	}
	if n := leasesBroken.Load() - broken; n != 1 {
		t.Fatalf("%d leases released on a break, want 1", n)
	}
	r := tr.reopen(t)
	m = mustFind(t, r, "vm", m.ID[:8])
	restoreBytes(t, r, m) // verifies every chunk against its ID
	checkSegmentIDs(t, r, m)
	if rep, err := r.Check(context.Background(), CheckOptions{ReadData: true}); err != nil || !rep.OK() {
		t.Fatalf("check --read-data: %v %v", err, rep.Damage)
	}
}

// A chunk sealed in place while the lease went is sealed again from a
// private copy: the lease here is a real one, given back before the
// segment is stored, as a writer's break would have it.
func TestLeaseGoneChunkSealedPrivately(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(23, 6<<20)
	path := writeImageFile(t, img)
	_, l := openLeased(t, path)
	if !l.held() {
		t.Fatal("a lease just taken is not held")
	}
	l.release()
	if l.held() {
		t.Fatal("a lease given back is still held")
	}
	if _, err := tr.LoadIndex(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := &backupState{r: tr.Repository, inFly: map[crypto.ID]*pendingObject{}}
	sp, err := chunk.NewSplitter(tr.cfg.ChunkerPolynomial)
	if err != nil {
		t.Fatal(err)
	}
	seg := bytes.Clone(img[:4<<20])
	priv := make([]byte, len(seg))
	redone := inPlaceRedone.Load()
	var stored int
	err = st.splitGuided(sp, seg, nil, nil, func() []byte { return priv }, l, func(p chunk.Piece, id crypto.ID, sealed []byte) error {
		if p.Zero {
			return nil
		}
		if sealed != nil {
			t.Fatal("a chunk sealed in place although the lease was gone")
		}
		if &p.Data[0] != &priv[p.Offset] {
			t.Fatal("a chunk to store is not the private copy")
		}
		if id != tr.chunkH.Sum(p.Data) {
			t.Fatal("chunk ID is not the hash of its bytes")
		}
		stored++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if stored == 0 || inPlaceRedone.Load()-redone != int64(stored) {
		t.Fatalf("%d chunks, %d sealed again privately", stored, inPlaceRedone.Load()-redone)
	}
}

// A file someone has open for writing gets no lease.
func TestNoLeaseWhileOpenForWriting(t *testing.T) {
	path := writeImageFile(t, make([]byte, 1<<20))
	leaseOrSkip(t, path)
	w, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if l := takeReadLease(f); l != nil {
		l.release()
		t.Fatal("a read lease on a file open for writing")
	}
}
