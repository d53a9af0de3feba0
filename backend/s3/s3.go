// Package s3 stores repository objects in a bucket of an S3-compatible
// object store (MinIO, Ceph RGW, AWS and others), optionally under a key
// prefix.
//
// Rules this code keeps:
//
//   - An object is never replaced. Put sends `If-None-Match: *`, which the
//     store evaluates atomically: of several writers of one name exactly
//     one wins and the others get 412, reported as backend.ErrExist. A
//     store that answers the header with "not implemented" is remembered
//     as lacking it, and Put then checks with HEAD first: that guarantees
//     no replacement except by a writer racing for the same name between
//     the HEAD and the PUT, which for content-addressed objects writes the
//     same bytes. A store that silently ignores the header cannot be
//     detected; docs/server.md names the stores tested.
//   - A PUT is one request (no multipart: objects are at most a few MiB),
//     so an object is visible whole or not at all.
//   - Retries live in one place, the backend/retry wrapper: the SDK's own
//     retries are switched off, and errors worth retrying (5xx, SlowDown
//     and other throttling codes, dropped connections) are marked
//     transient here.
//   - Objects under object-lock retention are never deleted: Delete
//     checks the retention date first and reports backend.ErrRetained
//     without sending a DELETE. Lock objects (locks/) are the exception:
//     a lease must disappear when released, so their delete leaves a
//     delete marker and the locked version stays until it expires.
//   - A credential that may not delete (the append-only account in
//     docs/server.md) gets backend.ErrReadOnly from Delete.
//   - ModTime is the store's LastModified: the store's clock, not ours.
//   - Credentials never appear in Location or error messages.
package s3

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"vmvault/backend"
)

// DefaultConnections is how many requests may be in flight at once by
// default (uploads from the backup's workers, fetch-ahead of a restore).
const DefaultConnections = 16

// Config describes how to reach a repository.
type Config struct {
	// URL is "s3:https://HOST[:PORT]/BUCKET[/PREFIX]" or the same with
	// http:// for a plain-HTTP endpoint such as a local MinIO.
	URL string
	// AccessKeyID and SecretAccessKey are credentials from the
	// configuration file. The environment (AWS_ACCESS_KEY_ID and
	// AWS_SECRET_ACCESS_KEY) wins over them; without either, the shared
	// credentials file (AWS_SHARED_CREDENTIALS_FILE, default
	// ~/.aws/credentials) is read for Profile.
	AccessKeyID     string
	SecretAccessKey string
	// Profile is the shared credentials file's profile; AWS_PROFILE wins,
	// empty means "default".
	Profile string
	// Region is the bucket's region; AWS_REGION or AWS_DEFAULT_REGION
	// when empty, else the store is asked (GetBucketLocation).
	Region string
	// CAFile is a PEM file of certificate authorities trusted for https
	// instead of the system's.
	CAFile string
	// PathStyle addresses the bucket as HOST/BUCKET rather than as
	// BUCKET.HOST (needed by most MinIO and Ceph installations; the SDK
	// chooses by itself when false).
	PathStyle bool
	// Connections bounds the requests in flight, which is also the
	// number of connections kept open for reuse (DefaultConnections when
	// zero).
	Connections int
	// ObjectLockDays, when positive, writes every object except locks
	// with a COMPLIANCE retention of that many days (the bucket must have
	// object lock enabled). Zero leaves retention to the bucket's default.
	ObjectLockDays int
	// Create makes the bucket when it does not exist (init); otherwise a
	// missing bucket is an error wrapping backend.ErrNotExist.
	Create bool
	// Logger receives notices; nil means slog.Default().
	Logger *slog.Logger
}

// Backend is a repository in an S3 bucket. It is safe for concurrent use.
type Backend struct {
	client    *minio.Client
	transport *http.Transport
	bucket    string
	prefix    string // "" or "some/prefix/" (always ending in a slash)
	location  string
	lockDays  int
	log       *slog.Logger
	// noConditional is set once the store has answered If-None-Match
	// with "not implemented".
	noConditional atomic.Bool
}

// target is a parsed repository URL.
type target struct {
	secure         bool
	host           string // host[:port]
	bucket, prefix string
}

func (t target) location() string {
	scheme := "http"
	if t.secure {
		scheme = "https"
	}
	l := "s3:" + scheme + "://" + t.host + "/" + t.bucket
	if t.prefix != "" {
		l += "/" + strings.TrimSuffix(t.prefix, "/")
	}
	return l
}

// IsURL reports whether s names an S3 repository.
func IsURL(s string) bool { return strings.HasPrefix(s, "s3:") }

// parseURL checks "s3:http(s)://host[:port]/bucket[/prefix]".
func parseURL(s string) (target, error) {
	rest, ok := strings.CutPrefix(s, "s3:")
	if !ok {
		return target{}, fmt.Errorf("s3 repository url %q: must start with s3:https:// or s3:http://", s)
	}
	u, err := url.Parse(rest)
	if err != nil {
		return target{}, fmt.Errorf("s3 repository url %q: %w", s, err)
	}
	var t target
	switch u.Scheme {
	case "https":
		t.secure = true
	case "http":
	default:
		return target{}, fmt.Errorf("s3 repository url %q: want s3:https://HOST[:PORT]/BUCKET[/PREFIX] or s3:http://…", s)
	}
	if u.User != nil {
		return target{}, fmt.Errorf("s3 repository url %s://%s…: credentials do not belong in the url; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the configuration", u.Scheme, u.Host)
	}
	if u.Hostname() == "" {
		return target{}, fmt.Errorf("s3 repository url %q: no host", s)
	}
	if p := u.Port(); p != "" {
		if n, err := net.LookupPort("tcp", p); err != nil || n <= 0 || n > 65535 {
			return target{}, fmt.Errorf("s3 repository url %q: bad port %q", s, p)
		}
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return target{}, fmt.Errorf("s3 repository url %q: unexpected query or fragment", s)
	}
	t.host = u.Host
	p := strings.Trim(u.Path, "/")
	if p == "" {
		return target{}, fmt.Errorf("s3 repository url %q: no bucket", s)
	}
	t.bucket, t.prefix, _ = strings.Cut(p, "/")
	if t.prefix != "" {
		if path.Clean(t.prefix) != t.prefix || strings.HasPrefix(t.prefix, "..") {
			return target{}, fmt.Errorf("s3 repository url %q: bad prefix %q", s, t.prefix)
		}
		t.prefix += "/"
	}
	return t, nil
}

// credentialsFor picks the first source that has credentials: the
// environment, the configuration, the shared credentials file.
func credentialsFor(cfg Config) (*credentials.Credentials, error) {
	if id, secret := os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"); id != "" || secret != "" {
		if id == "" || secret == "" {
			return nil, errors.New("s3 credentials: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither")
		}
		return credentials.NewStaticV4(id, secret, os.Getenv("AWS_SESSION_TOKEN")), nil
	}
	if cfg.AccessKeyID != "" || cfg.SecretAccessKey != "" {
		if cfg.AccessKeyID == "" || cfg.SecretAccessKey == "" {
			return nil, errors.New("s3 credentials: the configuration needs both s3_access_key_id and s3_secret_access_key_file")
		}
		return credentials.NewStaticV4(cfg.AccessKeyID, cfg.SecretAccessKey, ""), nil
	}
	profile := os.Getenv("AWS_PROFILE")
	if profile == "" {
		profile = cfg.Profile
	}
	if profile == "" {
		profile = "default"
	}
	file := os.Getenv("AWS_SHARED_CREDENTIALS_FILE")
	if file == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return nil, fmt.Errorf("s3 credentials: %w", err)
		}
		file = filepath.Join(home, ".aws", "credentials")
	}
	creds := credentials.NewFileAWSCredentials(file, profile)
	v, err := creds.GetWithContext(nil)
	if err != nil || v.AccessKeyID == "" {
		return nil, fmt.Errorf("no s3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, s3_access_key_id and s3_secret_access_key_file in [repository], or profile %q in %s", profile, file)
	}
	return creds, nil
}

// transport is an HTTP transport sized for many requests in flight, with
// the configured certificate authorities.
func transport(cfg Config, conns int) (*http.Transport, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	// At most conns connections, every one kept for reuse: a request
	// beyond them waits for a free connection rather than opening one
	// that would be closed after a single use (a restore's fetch-ahead
	// once opened a new connection for every third chunk that way).
	tr.MaxConnsPerHost = conns
	tr.MaxIdleConns = conns
	tr.MaxIdleConnsPerHost = conns
	tr.ResponseHeaderTimeout = 2 * time.Minute
	tr.DisableCompression = true // objects are compressed and encrypted already
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("s3 ca file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("s3 ca file %s: no PEM certificates in it", cfg.CAFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return tr, nil
}

// Open connects to the bucket described by cfg and checks that it exists
// (creating it with cfg.Create).
func Open(ctx context.Context, cfg Config) (*Backend, error) {
	t, err := parseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	creds, err := credentialsFor(cfg)
	if err != nil {
		return nil, err
	}
	conns := cfg.Connections
	if conns <= 0 {
		conns = DefaultConnections
	}
	tr, err := transport(cfg, conns)
	if err != nil {
		return nil, err
	}
	region := cfg.Region
	if region == "" {
		region = os.Getenv("AWS_REGION")
	}
	if region == "" {
		region = os.Getenv("AWS_DEFAULT_REGION")
	}
	opts := &minio.Options{
		Creds:      creds,
		Secure:     t.secure,
		Transport:  tr,
		Region:     region,
		MaxRetries: 1, // retries are backend/retry's job
	}
	if cfg.PathStyle {
		opts.BucketLookup = minio.BucketLookupPath
	}
	client, err := minio.New(t.host, opts)
	if err != nil {
		return nil, fmt.Errorf("s3 client for %s: %w", t.location(), err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	b := &Backend{client: client, transport: tr, bucket: t.bucket, prefix: t.prefix, location: t.location(),
		lockDays: cfg.ObjectLockDays, log: log.With("repository", t.location())}
	exists, err := client.BucketExists(ctx, t.bucket)
	if err != nil {
		return nil, b.mapErr("open bucket", t.bucket, err)
	}
	if !exists {
		if !cfg.Create {
			return nil, fmt.Errorf("bucket %s at %s: %w", t.bucket, t.host, backend.ErrNotExist)
		}
		if err := client.MakeBucket(ctx, t.bucket, minio.MakeBucketOptions{Region: region, ObjectLocking: cfg.ObjectLockDays > 0}); err != nil {
			return nil, b.mapErr("create bucket", t.bucket, err)
		}
		b.log.Info("created bucket", "bucket", t.bucket, "object_lock", cfg.ObjectLockDays > 0)
	}
	return b, nil
}

// Location returns the repository URL (no credentials).
func (b *Backend) Location() string { return b.location }

// Close releases idle connections.
func (b *Backend) Close() error {
	b.transport.CloseIdleConnections()
	return nil
}

// key maps an object name to the bucket key, refusing names that are not
// clean relative paths (the same rule as the other backends).
func (b *Backend) key(name string) (string, error) {
	if name == "" || path.Clean(name) != name || strings.HasPrefix(name, "/") || strings.HasPrefix(name, "..") {
		return "", fmt.Errorf("invalid object name %q", name)
	}
	return b.prefix + name, nil
}

// Put stores data under name unless the name exists.
func (b *Backend) Put(ctx context.Context, name string, data []byte) error {
	key, err := b.key(name)
	if err != nil {
		return err
	}
	opts := minio.PutObjectOptions{
		DisableMultipart: true,
		ContentType:      "application/octet-stream",
		// No SHA-256 of the payload for the signature (over https the SDK
		// sends none anyway): it costs both sides a core at this machine's
		// ~300 MB/s, and every object is authenticated by its own AEAD
		// tag, checked on every read.
		DisableContentSha256: true,
	}
	if b.lockDays > 0 && !strings.HasPrefix(name, "locks/") {
		opts.Mode = minio.Compliance
		opts.RetainUntilDate = time.Now().Add(time.Duration(b.lockDays) * 24 * time.Hour)
	}
	if b.noConditional.Load() {
		// The documented fallback: see the package comment.
		if _, err := b.Stat(ctx, name); err == nil {
			return fmt.Errorf("put %s: %w", name, backend.ErrExist)
		} else if !errors.Is(err, backend.ErrNotExist) {
			return err
		}
	} else {
		opts.SetMatchETagExcept("*")
	}
	_, err = b.client.PutObject(ctx, b.bucket, key, bytes.NewReader(data), int64(len(data)), opts)
	if err != nil && !b.noConditional.Load() {
		if r := minio.ToErrorResponse(err); r.StatusCode == http.StatusNotImplemented || r.Code == "NotImplemented" {
			b.noConditional.Store(true)
			b.log.Warn("the store does not implement conditional writes (If-None-Match); checking for an existing object before each upload instead")
			return b.Put(ctx, name, data)
		}
	}
	if err != nil {
		return b.mapErr("put", name, err)
	}
	return nil
}

// Get reads length bytes at off (length < 0: to the end).
func (b *Backend) Get(ctx context.Context, name string, off, length int64) ([]byte, error) {
	key, err := b.key(name)
	if err != nil {
		return nil, err
	}
	if off < 0 {
		return nil, fmt.Errorf("get %s: negative offset %d", name, off)
	}
	if length == 0 {
		// S3 has no empty range: check existence and size instead.
		oi, err := b.Stat(ctx, name)
		if err != nil {
			return nil, err
		}
		if off > oi.Size {
			return nil, fmt.Errorf("get %s: offset %d beyond size %d", name, off, oi.Size)
		}
		return []byte{}, nil
	}
	var opts minio.GetObjectOptions
	switch {
	case length > 0:
		err = opts.SetRange(off, off+length-1)
	case off > 0:
		err = opts.SetRange(off, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", name, err)
	}
	// Core.GetObject answers with the body and its length in one request,
	// so the buffer is allocated once at its size.
	body, info, _, err := minio.Core{Client: b.client}.GetObject(ctx, b.bucket, key, opts)
	if err != nil {
		if r := minio.ToErrorResponse(err); r.StatusCode == http.StatusRequestedRangeNotSatisfiable {
			if length > 0 {
				return nil, fmt.Errorf("get %s: %d bytes at offset %d lie beyond the object's end: %w", name, length, off, io.ErrUnexpectedEOF)
			}
			return b.emptyTail(ctx, name, off)
		}
		return nil, b.mapErr("get", name, err)
	}
	defer body.Close()
	if length > 0 && info.Size != length {
		return nil, fmt.Errorf("get %s: short object (%d of %d bytes at offset %d): %w", name, info.Size, length, off, io.ErrUnexpectedEOF)
	}
	if info.Size < 0 || info.Size > 1<<31 {
		return nil, fmt.Errorf("get %s: the store announces %d bytes", name, info.Size)
	}
	buf := make([]byte, info.Size)
	if _, err := io.ReadFull(body, buf); err != nil {
		return nil, b.mapErr("get", name, fmt.Errorf("read body: %w", err))
	}
	return buf, nil
}

// GetAll reads the whole object in one GET: the size comes with the
// response headers, and an object over limit is refused before its body
// is read or a buffer allocated.
func (b *Backend) GetAll(ctx context.Context, name string, limit int64) ([]byte, error) {
	key, err := b.key(name)
	if err != nil {
		return nil, err
	}
	body, info, _, err := minio.Core{Client: b.client}.GetObject(ctx, b.bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return nil, b.mapErr("get", name, err)
	}
	defer body.Close()
	if err := backend.CheckSize(name, info.Size, limit); err != nil {
		return nil, err
	}
	buf := make([]byte, info.Size)
	if _, err := io.ReadFull(body, buf); err != nil {
		return nil, b.mapErr("get", name, fmt.Errorf("read body: %w", err))
	}
	return buf, nil
}

// GetInto reads the whole object into buf in one GET
// (backend.IntoGetter); the size in the response headers refuses one that
// does not fit before its body is read.
func (b *Backend) GetInto(ctx context.Context, name string, buf []byte) (int, error) {
	key, err := b.key(name)
	if err != nil {
		return 0, err
	}
	body, info, _, err := minio.Core{Client: b.client}.GetObject(ctx, b.bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return 0, b.mapErr("get", name, err)
	}
	defer body.Close()
	if err := backend.CheckSize(name, info.Size, int64(len(buf))-1); err != nil {
		return 0, err
	}
	n, err := io.ReadFull(body, buf[:info.Size])
	if err != nil {
		return 0, b.mapErr("get", name, fmt.Errorf("read body: %w", err))
	}
	return n, nil
}

// emptyTail answers a read from off to the end that the store refused
// as an unsatisfiable range: empty if off is exactly the size.
func (b *Backend) emptyTail(ctx context.Context, name string, off int64) ([]byte, error) {
	oi, err := b.Stat(ctx, name)
	if err != nil {
		return nil, err
	}
	if off != oi.Size {
		return nil, fmt.Errorf("get %s: offset %d beyond size %d", name, off, oi.Size)
	}
	return []byte{}, nil
}

// Stat returns an object's size and LastModified.
func (b *Backend) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	oi, err := b.stat(ctx, name)
	if err != nil {
		return backend.ObjectInfo{}, err
	}
	return backend.ObjectInfo{Name: name, Size: oi.Size, ModTime: oi.LastModified}, nil
}

func (b *Backend) stat(ctx context.Context, name string) (minio.ObjectInfo, error) {
	key, err := b.key(name)
	if err != nil {
		return minio.ObjectInfo{}, err
	}
	oi, err := b.client.StatObject(ctx, b.bucket, key, minio.StatObjectOptions{})
	if err != nil {
		return minio.ObjectInfo{}, b.mapErr("stat", name, err)
	}
	return oi, nil
}

// List calls fn for every object under prefix; the SDK follows the
// store's pagination (1000 keys a page on AWS and MinIO).
func (b *Backend) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // stops the SDK's listing goroutine on an early return
	for oi := range b.client.ListObjects(ctx, b.bucket, minio.ListObjectsOptions{Prefix: b.prefix + prefix, Recursive: true}) {
		if oi.Err != nil {
			return b.mapErr("list", prefix, oi.Err)
		}
		name := strings.TrimPrefix(oi.Key, b.prefix)
		if strings.HasSuffix(name, "/") {
			continue // a "directory" placeholder some tools create
		}
		if err := fn(backend.ObjectInfo{Name: name, Size: oi.Size, ModTime: oi.LastModified}); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// retainUntilHeader carries an object's retention date in HEAD answers.
const retainUntilHeader = "X-Amz-Object-Lock-Retain-Until-Date"

// Delete removes an object, unless it is under retention (ErrRetained).
// In a versioned bucket (object lock needs versioning) it removes the
// version it found, so the space is freed; only expired or unlocked
// versions can go.
func (b *Backend) Delete(ctx context.Context, name string) error {
	key, err := b.key(name)
	if err != nil {
		return err
	}
	oi, err := b.stat(ctx, name)
	if errors.Is(err, backend.ErrNotExist) {
		// S3 deletes of missing keys succeed; sending one anyway tells
		// whether this credential may delete at all (403 if not), which
		// is how repo.CheckDeletable finds an append-only account.
		if derr := b.client.RemoveObject(ctx, b.bucket, key, minio.RemoveObjectOptions{}); derr != nil {
			return b.mapErr("delete", name, derr)
		}
		return err
	}
	if err != nil {
		return err
	}
	opts := minio.RemoveObjectOptions{VersionID: oi.VersionID}
	if until, err := time.Parse(time.RFC3339, oi.Metadata.Get(retainUntilHeader)); err == nil && until.After(time.Now()) {
		if !strings.HasPrefix(name, "locks/") {
			return fmt.Errorf("delete %s: retained until %s: %w", name, until.UTC().Format(time.RFC3339), backend.ErrRetained)
		}
		// A released lease must vanish from listings: a delete marker
		// hides it, the locked version expires on its own.
		opts.VersionID = ""
	}
	if err := b.client.RemoveObject(ctx, b.bucket, key, opts); err != nil {
		return b.mapErr("delete", name, err)
	}
	return nil
}

// transientError marks an error that backend/retry should retry.
type transientError struct{ err error }

func (e *transientError) Error() string   { return e.err.Error() }
func (e *transientError) Unwrap() error   { return e.err }
func (e *transientError) Transient() bool { return true }

// throttled are the S3 error codes that ask the client to slow down or
// try again.
var throttled = map[string]bool{
	"SlowDown": true, "SlowDownRead": true, "SlowDownWrite": true, "Throttling": true,
	"ThrottlingException": true, "RequestLimitExceeded": true, "RequestThrottled": true,
	"RequestTimeout": true, "InternalError": true, "ServiceUnavailable": true,
	"XMinioServerNotInitialized": true, "ConditionalRequestConflict": true,
}

// mapErr turns an SDK error into the backend's sentinels, a transient
// error, or a plain error naming the object.
func (b *Backend) mapErr(op, name string, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s %s: %w", op, name, err)
	}
	r := minio.ToErrorResponse(err)
	switch {
	case r.Code == "NoSuchKey" || r.Code == "NotFound" || (r.StatusCode == http.StatusNotFound && r.Code != "NoSuchBucket"):
		return fmt.Errorf("%s %s: %w", op, name, backend.ErrNotExist)
	case r.Code == "NoSuchBucket":
		return fmt.Errorf("%s %s: bucket %s does not exist: %w", op, name, b.bucket, backend.ErrNotExist)
	case r.Code == "PreconditionFailed" || r.StatusCode == http.StatusPreconditionFailed:
		return fmt.Errorf("%s %s: %w", op, name, backend.ErrExist)
	case op == "delete" && strings.Contains(r.Message, "WORM"):
		return fmt.Errorf("%s %s: %s: %w", op, name, r.Message, backend.ErrRetained)
	case op == "delete" && (r.Code == "AccessDenied" || r.StatusCode == http.StatusForbidden):
		return fmt.Errorf("%s %s: the s3 credential may not delete: %w", op, name, backend.ErrReadOnly)
	case r.Code == "AccessDenied" || r.StatusCode == http.StatusForbidden:
		return fmt.Errorf("%s %s: access denied by %s (a wrong access key or secret, or the credential's policy forbids it): %w", op, name, b.location, os.ErrPermission)
	case r.Code == "InvalidAccessKeyId" || r.Code == "SignatureDoesNotMatch":
		return fmt.Errorf("%s %s: %s (check the s3 access key and secret): %w", op, name, r.Code, os.ErrPermission)
	case throttled[r.Code] || r.StatusCode >= 500 || r.StatusCode == http.StatusTooManyRequests:
		return &transientError{fmt.Errorf("%s %s: %s (http %d): %w", op, name, r.Code, r.StatusCode, err)}
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		// A body cut short: the connection dropped mid-answer.
		return &transientError{fmt.Errorf("%s %s: %w", op, name, err)}
	}
	// Dropped connections and timeouts: retry.Transient finds them in
	// the chain.
	return fmt.Errorf("%s %s: %w", op, name, err)
}

var _ backend.Backend = (*Backend)(nil)
