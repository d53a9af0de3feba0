package s3

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"vmvault/backend"
	"vmvault/internal/testminio"
)

// With ObjectLockDays the bucket is created with object lock, every
// object but locks is written under COMPLIANCE retention, Delete refuses
// retained objects with ErrRetained and leaves them readable, and a
// released lock still disappears from listings.
func TestObjectLockRetention(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	cfg := rootConfig(t, s, "/repo")
	cfg.ObjectLockDays = 2
	b := open(t, cfg)
	ctx := context.Background()
	data := []byte("a chunk")
	if err := b.Put(ctx, "data/00/aa", data); err != nil {
		t.Fatal(err)
	}
	if err := b.Put(ctx, "locks/l1", []byte("lease")); err != nil {
		t.Fatal(err)
	}
	oi, err := b.stat(ctx, "data/00/aa")
	if err != nil {
		t.Fatal(err)
	}
	until, err := time.Parse(time.RFC3339, oi.Metadata.Get(retainUntilHeader))
	if err != nil || until.Before(time.Now().Add(47*time.Hour)) || until.After(time.Now().Add(49*time.Hour)) {
		t.Fatalf("retain-until %q (%v), want about 48 h from now", oi.Metadata.Get(retainUntilHeader), err)
	}
	if mode := oi.Metadata.Get("X-Amz-Object-Lock-Mode"); mode != "COMPLIANCE" {
		t.Fatalf("lock mode %q, want COMPLIANCE", mode)
	}
	err = b.Delete(ctx, "data/00/aa")
	if !errors.Is(err, backend.ErrRetained) || !strings.Contains(err.Error(), "retained until") {
		t.Fatalf("delete of a retained object: %v, want ErrRetained with the date", err)
	}
	if got, err := b.Get(ctx, "data/00/aa", 0, -1); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("retained object after the refused delete: %q %v", got, err)
	}
	if err := b.Delete(ctx, "locks/l1"); err != nil {
		t.Fatalf("delete of a released lock: %v", err)
	}
	if _, err := b.Stat(ctx, "locks/l1"); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("released lock still visible: %v", err)
	}
	// Even the administrator cannot remove the locked version.
	out, err := s.TryMC(t, "rm", "--version-id", oi.VersionID, "t/"+b.bucket+"/repo/data/00/aa")
	if err == nil {
		t.Fatalf("mc rm of a locked version succeeded: %s", out)
	}
}

// A bucket whose default retention was set by the administrator (mc
// retention set --default) protects objects written without any lock
// option, and Delete sees it.
func TestObjectLockBucketDefault(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	s.MC(t, "mb", "--with-lock", "t/locked")
	s.MC(t, "retention", "set", "--default", "compliance", "1d", "t/locked")
	cfg := rootConfig(t, s, "")
	cfg.URL = s.URL("locked")
	cfg.Create = false
	b := open(t, cfg)
	ctx := context.Background()
	if err := b.Put(ctx, "data/00/bb", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := b.Delete(ctx, "data/00/bb"); !errors.Is(err, backend.ErrRetained) {
		t.Fatalf("delete under the bucket's default retention: %v, want ErrRetained", err)
	}
	if _, err := b.Stat(ctx, "data/00/bb"); err != nil {
		t.Fatalf("object gone after the refused delete: %v", err)
	}
}

// In a versioned bucket (object lock implies versioning) Delete removes
// the version it found, so no noncurrent copy keeps the space, and prune's
// permission probe (a delete of a missing name) leaves nothing on MinIO;
// a plain delete without a version id, as other tools send, only adds a
// delete marker and keeps the data. docs/server.md states all three.
func TestVersionedBucketDelete(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	s.MC(t, "mb", "t/versioned")
	s.MC(t, "version", "enable", "t/versioned")
	cfg := rootConfig(t, s, "")
	cfg.URL = s.URL("versioned")
	cfg.Create = false
	b := open(t, cfg)
	ctx := context.Background()
	for _, name := range []string{"data/00/cc", "data/00/dd"} {
		if err := b.Put(ctx, name, []byte("a chunk")); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Delete(ctx, "data/00/cc"); err != nil {
		t.Fatal(err)
	}
	if err := b.Delete(ctx, "locks/probe"); !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("delete of a missing name: %v, want ErrNotExist", err)
	}
	if err := b.client.RemoveObject(ctx, b.bucket, "data/00/dd", minio.RemoveObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	versions := map[string][]string{}
	for oi := range b.client.ListObjects(ctx, b.bucket, minio.ListObjectsOptions{Recursive: true, WithVersions: true}) {
		if oi.Err != nil {
			t.Fatal(oi.Err)
		}
		kind := "version"
		if oi.IsDeleteMarker {
			kind = "delete marker"
		}
		versions[oi.Key] = append(versions[oi.Key], kind)
	}
	if v := versions["data/00/cc"]; len(v) != 0 {
		t.Errorf("Delete left %v, want nothing", v)
	}
	if v := versions["locks/probe"]; len(v) != 0 {
		t.Errorf("the probe left %v, want nothing", v)
	}
	if v := strings.Join(versions["data/00/dd"], ","); v != "delete marker,version" && v != "version,delete marker" {
		t.Errorf("a delete without version id left %q, want a delete marker and the version", v)
	}
}
