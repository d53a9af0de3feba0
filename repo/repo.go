// Package repo owns the vmvault repository format: keys, config, data
// objects (chunks and segment lists), indexes, manifests and locks, and the
// operations on them (backup, restore, check, prune).
//
// docs/format.md specifies the format; this package is its reference
// implementation. It talks to storage only through backend.Backend.
package repo

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"vmvault/backend"
	"vmvault/chunk"
	"vmvault/crypto"
)

// ErrNotRepository means the location holds no vmvault repository.
var ErrNotRepository = errors.New("not a vmvault repository")

// Repository is an open, unlocked repository.
type Repository struct {
	be      backend.Backend
	cfg     Config
	master  *crypto.MasterKey
	keyName string
	// password opened the repository; key management (key passwd) needs
	// it to find every key file it opens.
	password []byte
	codec    *codec
	chunkH   *crypto.Hasher
	segH     *crypto.Hasher // segment IDs of version-2 generations (content)
	segListH *crypto.Hasher // segment IDs since version 3 (segment list)
	imageH   *crypto.Hasher
	tableH   *crypto.Hasher
	log      *slog.Logger
	// segmenter cuts images into content-defined segments.
	segmenter *chunk.Segmenter

	cacheDir string
	idx      *Index
	// tableSegments is how many segment IDs a backup puts in one
	// segment table: TableSegments, smaller only in tests.
	tableSegments int

	clock       storeClock    // the store's clock, learnt from lock objects
	lockRefresh time.Duration // LockRefresh, shorter only in tests
	locksMu     sync.Mutex
	held        []*Lock  // locks taken through this Repository
	junk        sync.Map // names of unparsable objects already warned about

	// beforeDirectWrite, when set (tests only), is called by each
	// direct write of a restore target before it is issued.
	beforeDirectWrite func()
}

// warnJunk warns once per Repository about an object that does not
// parse and is otherwise ignored (anyone with add-only access can
// create one; it must not stop the admin's tools).
func (r *Repository) warnJunk(name string, err error) {
	if _, dup := r.junk.LoadOrStore(name, true); !dup {
		r.log.Warn("ignoring an object that is not a valid "+strings.SplitN(name, "/", 2)[0]+" entry", "object", name, "err", err)
	}
}

// Options configure Open and Init.
type Options struct {
	// CacheDir is the directory for local caches; a subdirectory per
	// repository ID is used. Empty means $XDG_CACHE_HOME/vmvault
	// (~/.cache/vmvault).
	CacheDir string
	// Logger receives progress and warnings; nil discards.
	Logger *slog.Logger
	// KDF overrides the argon2id parameters of a new key (Init); zero
	// means crypto.DefaultKDFParams (RFC 9106: t=3, 64 MiB, p=4).
	KDF crypto.KDFParams
	// SegmentSize of a new repository (Init); zero means the default.
	SegmentSize int64
}

// DefaultCacheDir returns $XDG_CACHE_HOME/vmvault or ~/.cache/vmvault.
func DefaultCacheDir() string {
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "vmvault")
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "vmvault")
	}
	return filepath.Join(os.TempDir(), "vmvault-cache")
}

func (o *Options) kdf() crypto.KDFParams {
	if o.KDF.Time == 0 {
		return crypto.DefaultKDFParams
	}
	return o.KDF
}

// Init creates a new repository in an empty location.
func Init(ctx context.Context, be backend.Backend, password []byte, opts Options) (*Repository, error) {
	if _, err := be.Stat(ctx, configName); err == nil {
		return nil, fmt.Errorf("%s already holds a repository", be.Location())
	} else if !errors.Is(err, backend.ErrNotExist) {
		return nil, err
	}
	if len(password) == 0 {
		return nil, errors.New("empty password")
	}
	mk, err := crypto.NewMasterKey()
	if err != nil {
		return nil, err
	}
	pol, err := chunk.NewPolynomial()
	if err != nil {
		return nil, err
	}
	segSize := opts.SegmentSize
	if segSize == 0 {
		segSize = DefaultSegmentSize
	}
	rid := randomID()
	cfg := Config{Version: FormatVersion, ID: hex.EncodeToString(rid[:]), ChunkerPolynomial: pol,
		SegmentSize: segSize, Created: time.Now().UTC()}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	r, err := newRepository(be, mk, cfg, opts)
	if err != nil {
		return nil, err
	}
	r.password = password
	keyID, err := r.AddKey(ctx, password, opts.kdf())
	if err != nil {
		return nil, fmt.Errorf("write key: %w", err)
	}
	r.keyName = "keys/" + keyID
	raw, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	// config is written last: a location with keys but no config is an
	// interrupted init, which a rerun of init reports as not a repository.
	if err := be.Put(ctx, configName, r.codec.seal(TypeConfig, configName, raw)); err != nil {
		return nil, fmt.Errorf("write config: %w", err)
	}
	return r, nil
}

// Open unlocks an existing repository with password.
func Open(ctx context.Context, be backend.Backend, password []byte, opts Options) (*Repository, error) {
	sealed, err := getBounded(ctx, be, configName, maxSmallObject)
	if errors.Is(err, backend.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", be.Location(), ErrNotRepository)
	}
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	hint := keyHintPath(opts.CacheDir, be)
	mk, keyName, err := unlock(ctx, be, password, hint)
	if err != nil {
		return nil, err
	}
	probe, err := newCodec(mk.Encrypt[:])
	if err != nil {
		return nil, err
	}
	raw, err := probe.open(TypeConfig, configName, sealed)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var cfg Config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return nil, fmt.Errorf("config: %w: %w", ErrCorrupt, err)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	r, err := newRepository(be, mk, cfg, opts)
	if err != nil {
		return nil, err
	}
	r.keyName, r.password = keyName, password
	rememberKey(hint, keyName)
	return r, nil
}

func newRepository(be backend.Backend, mk *crypto.MasterKey, cfg Config, opts Options) (*Repository, error) {
	c, err := newCodec(mk.Encrypt[:])
	if err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cacheDir := opts.CacheDir
	if cacheDir == "" {
		cacheDir = DefaultCacheDir()
	}
	return &Repository{be: be, cfg: cfg, master: mk, codec: c,
		chunkH: crypto.NewHasher(mk.ID, "chunk"), segH: crypto.NewHasher(mk.ID, "segment"),
		segListH: crypto.NewHasher(mk.ID, "segment-list"),
		imageH:   crypto.NewHasher(mk.ID, "image"), tableH: crypto.NewHasher(mk.ID, "table"), log: log,
		cacheDir: filepath.Join(cacheDir, cfg.ID), tableSegments: TableSegments, lockRefresh: LockRefresh,
		segmenter: newSegmenter(mk, cfg.SegmentSize)}, nil
}

// Config returns the repository's parameters.
func (r *Repository) Config() Config { return r.cfg }

// Backend returns the store the repository lives in.
func (r *Repository) Backend() backend.Backend { return r.be }

// Close releases the local index cache. It does not close the backend.
func (r *Repository) Close() error {
	if r.idx != nil {
		err := r.idx.Close()
		r.idx = nil
		return err
	}
	return nil
}

// getData fetches, authenticates and opens the data object id (a chunk,
// segment list or segment table), which must be of type t.
func (r *Repository) getData(ctx context.Context, t ObjectType, id crypto.ID) ([]byte, error) {
	name := dataName(id)
	sealed, err := getBounded(ctx, r.be, name, maxDataObject)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", t, name, err)
	}
	return r.codec.open(t, name, sealed)
}
