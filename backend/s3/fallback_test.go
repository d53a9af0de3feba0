package s3

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync/atomic"
	"testing"

	"vmvault/backend"
	"vmvault/internal/testminio"
)

// A store without conditional writes (it answers If-None-Match with 501
// NotImplemented, as some S3 implementations do) gets the documented
// fallback: a HEAD before each PUT, so an existing object is still never
// replaced. The store is real MinIO behind a proxy that plays the older
// server; real MinIO's own answer is tested by the conformance suite.
func TestNoConditionalWrites(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	u, _ := url.Parse("http://" + s.Endpoint)
	var refused atomic.Int64
	rp := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(u); r.Out.Host = r.In.Host }}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("If-None-Match") != "" {
			refused.Add(1)
			w.WriteHeader(http.StatusNotImplemented)
			io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code><Message>A header you provided implies functionality that is not implemented</Message></Error>`)
			return
		}
		rp.ServeHTTP(w, r)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	cfg := rootConfig(t, s, "")
	cfg.URL = "s3:http://" + l.Addr().String() + "/" + bucketName(t)
	b := open(t, cfg)
	ctx := context.Background()
	if err := b.Put(ctx, "config", []byte("first")); err != nil {
		t.Fatalf("put without conditional writes: %v", err)
	}
	if err := b.Put(ctx, "config", []byte("second")); !errors.Is(err, backend.ErrExist) {
		t.Fatalf("second put: %v, want ErrExist", err)
	}
	if got, _ := b.Get(ctx, "config", 0, -1); string(got) != "first" {
		t.Fatalf("object replaced: %q", got)
	}
	if refused.Load() != 1 || !b.noConditional.Load() {
		t.Fatalf("conditional PUTs sent: %d, want 1 (then the fallback)", refused.Load())
	}
}
