package repo

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

// failIndex refuses index writes: the only way to make a local backup
// lose its index flushes on purpose (a stand-in for a server that went
// away mid-backup; the SFTP tests do it with a real sshd).
type failIndex struct{ backend.Backend }

func (f failIndex) Put(ctx context.Context, name string, data []byte) error {
	if strings.HasPrefix(name, "index/") {
		return errors.New("injected: index write refused")
	}
	return f.Backend.Put(ctx, name, data)
}

func TestJournalRecovery(t *testing.T) {
	tr := newTestRepo(t)
	img := testImage(41, 24<<20)
	// First run: everything is stored, no index object gets written.
	good := tr.be
	tr.be = failIndex{good}
	_, err := tr.Backup(context.Background(), BackupRequest{VM: "vm01", Disks: []DiskSource{{Name: "d", Reader: bytes.NewReader(img), Size: int64(len(img))}}})
	tr.be = good
	if err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("backup with refused index writes: %v", err)
	}
	journals, _ := filepath.Glob(filepath.Join(tr.journalDir(), "*.journal"))
	if len(journals) != 1 {
		t.Fatalf("%d journals kept after a lost index", len(journals))
	}
	// Between the runs, one chunk disappears (an interrupted prune).
	var victim string
	var size int64
	good.List(context.Background(), "data/", func(o backend.ObjectInfo) error {
		if raw, err := good.Get(context.Background(), o.Name, 0, 4); err == nil && raw[2] == byte(TypeChunk) && o.Size > size {
			victim, size = o.Name, o.Size
		}
		return nil
	})
	os.Remove(filepath.Join(tr.dir, victim))

	r := tr.reopen(t)
	m, err := r.Backup(context.Background(), BackupRequest{VM: "vm01", Disks: []DiskSource{{Name: "d", Reader: bytes.NewReader(img), Size: int64(len(img))}}})
	if err != nil {
		t.Fatal(err)
	}
	// Only the missing chunk was stored again; its segment list was not
	// trusted (one of its chunks was gone), so that one segment was
	// chunked again and its list found already present.
	if m.Stats.ChunksNew != 1 || m.Stats.SegmentsNew != 1 || m.Stats.ObjectsFound != 1 {
		t.Fatalf("rerun after recovery: %+v", m.Stats)
	}
	if journals, _ = filepath.Glob(filepath.Join(tr.journalDir(), "*.journal")); len(journals) != 0 {
		t.Fatalf("journals left after a good run: %v", journals)
	}
	if got := restoreBytes(t, r, m); !bytes.Equal(got, img) {
		t.Fatal("generation after journal recovery restores wrong")
	}
	rep, err := r.Check(context.Background(), CheckOptions{ReadData: true})
	if err != nil || !rep.OK() {
		t.Fatalf("check: %v %+v", err, rep)
	}
}
