package s3

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sync/errgroup"

	"vmvault/backend"
	"vmvault/backend/backendtest"
	"vmvault/internal/testminio"
)

// rootConfig returns a Config for a fresh bucket (and prefix) on s with
// the root credentials, the environment's AWS variables cleared.
func rootConfig(t testing.TB, s *testminio.Server, prefix string) Config {
	t.Helper()
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	t.Setenv("AWS_PROFILE", "")
	return Config{URL: s.URL(bucketName(t) + prefix), AccessKeyID: s.RootUser, SecretAccessKey: s.RootPassword,
		PathStyle: true, Region: "us-east-1", Create: true, Logger: slog.New(slog.DiscardHandler)}
}

func bucketName(t testing.TB) string {
	b := make([]byte, 6)
	rand.Read(b)
	return "t-" + hex.EncodeToString(b)
}

func open(t testing.TB, cfg Config) *Backend {
	t.Helper()
	b, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open %s: %v", cfg.URL, err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// The backend contract against a real MinIO: once at the bucket's root,
// once under a prefix (which List must strip and confine itself to).
func TestConformance(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	for _, prefix := range []string{"", "/some/prefix"} {
		t.Run("prefix="+prefix, func(t *testing.T) {
			backendtest.Run(t, func(t *testing.T) backend.Backend {
				return open(t, rootConfig(t, s, prefix))
			}, backendtest.Options{})
		})
	}
}

// Two repositories under different prefixes of one bucket do not see
// each other's objects.
func TestPrefixesAreSeparate(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	cfg := rootConfig(t, s, "/a")
	a := open(t, cfg)
	cfg.URL = strings.TrimSuffix(cfg.URL, "/a") + "/ab"
	ab := open(t, cfg)
	ctx := context.Background()
	if err := a.Put(ctx, "config", []byte("a")); err != nil {
		t.Fatal(err)
	}
	if err := ab.Put(ctx, "config", []byte("ab")); err != nil {
		t.Fatalf("put under the second prefix: %v", err)
	}
	n := 0
	a.List(ctx, "", func(oi backend.ObjectInfo) error { n++; return nil })
	if n != 1 {
		t.Fatalf("list under prefix a found %d objects, want 1", n)
	}
}

func TestOpenMissingBucket(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	cfg := rootConfig(t, s, "")
	cfg.Create = false
	_, err := Open(context.Background(), cfg)
	if !errors.Is(err, backend.ErrNotExist) {
		t.Fatalf("open of a missing bucket: %v, want ErrNotExist", err)
	}
}

func TestWrongSecret(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	cfg := rootConfig(t, s, "")
	cfg.SecretAccessKey = "wrong-secret-value"
	_, err := Open(context.Background(), cfg)
	if err == nil || !errors.Is(err, os.ErrPermission) || !strings.Contains(err.Error(), "access denied") || strings.Contains(err.Error(), "wrong-secret-value") {
		t.Fatalf("open with a wrong secret: %v", err)
	}
}

func TestURL(t *testing.T) {
	for _, tc := range []struct{ in, loc, host, bucket, prefix string }{
		{"s3:https://s3.example.org/bkt", "s3:https://s3.example.org/bkt", "s3.example.org", "bkt", ""},
		{"s3:http://127.0.0.1:9000/bkt/a/b/", "s3:http://127.0.0.1:9000/bkt/a/b", "127.0.0.1:9000", "bkt", "a/b/"},
		{"s3:https://[::1]:9000/bkt/p", "s3:https://[::1]:9000/bkt/p", "[::1]:9000", "bkt", "p/"},
	} {
		tg, err := parseURL(tc.in)
		if err != nil || tg.location() != tc.loc || tg.host != tc.host || tg.bucket != tc.bucket || tg.prefix != tc.prefix {
			t.Errorf("parseURL(%q) = %+v %q, %v", tc.in, tg, tg.location(), err)
		}
	}
	for _, bad := range []string{"s3://h/b", "s3:ftp://h/b", "s3:https://h", "s3:https://h/", "s3:https://key:secret@h/b",
		"s3:https://h:99999/b", "s3:https://h/b?x=1", "s3:https://h/b/../c", "/srv/repo"} {
		_, err := parseURL(bad)
		if err == nil {
			t.Errorf("parseURL(%q) accepted", bad)
		} else if strings.Contains(err.Error(), "secret") {
			t.Errorf("error leaks the secret: %v", err)
		}
	}
}

// Requests beyond Config.Connections wait for a free connection rather
// than each opening one that is closed after a single use: a restore's
// fetch-ahead, with more requests in flight than idle connections kept,
// once opened a new TCP connection for every third chunk it fetched.
func TestConnectionsReused(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	cfg := rootConfig(t, s, "")
	cfg.Connections = 4
	b := open(t, cfg)
	ctx := context.Background()
	names := make([]string, 64)
	for i := range names {
		data := []byte(fmt.Sprintf("object %d", i))
		names[i] = backendtest.DataName(data)
		if err := b.Put(ctx, names[i], data); err != nil {
			t.Fatal(err)
		}
	}
	var dials atomic.Int64
	dial := b.transport.DialContext
	b.transport.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return dial(ctx, network, addr)
	}
	b.transport.CloseIdleConnections()
	for range 3 {
		g, gctx := errgroup.WithContext(ctx)
		for _, name := range names {
			g.Go(func() error {
				_, err := b.GetAll(gctx, name, 1<<20)
				return err
			})
		}
		if err := g.Wait(); err != nil {
			t.Fatal(err)
		}
	}
	if n := dials.Load(); n > int64(cfg.Connections) {
		t.Fatalf("%d connections opened for 3 × 64 concurrent reads, want at most %d", n, cfg.Connections)
	}
}
