package repo

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"vmvault/backend"
	"vmvault/crypto"
)

// ErrWrongPassword means no key file of the repository opens with the
// given password.
var ErrWrongPassword = errors.New("wrong password: no key in the repository matches")

// keyFile is the JSON stored as keys/<id>: the master keys sealed under a
// password-derived key. It is the only object not sealed by the master key.
type keyFile struct {
	Version int              `json:"version"`
	Created time.Time        `json:"created"`
	Host    string           `json:"host"`
	User    string           `json:"user"`
	KDF     string           `json:"kdf"`
	Params  crypto.KDFParams `json:"params"`
	Salt    []byte           `json:"salt"`
	Data    []byte           `json:"data"` // sealed masterKeyJSON
}

type masterKeyJSON struct {
	Encrypt []byte `json:"encrypt"`
	ID      []byte `json:"id"`
}

// KeyInfo describes one key file for `vmvault key list`.
type KeyInfo struct {
	ID      string    `json:"id"`
	Current bool      `json:"current"`
	Created time.Time `json:"created"`
	Host    string    `json:"host"`
	User    string    `json:"user"`
}

const keyAD = "vmvault key"

func sealMasterKey(mk *crypto.MasterKey, password []byte, params crypto.KDFParams) ([]byte, error) {
	salt, err := crypto.NewSalt()
	if err != nil {
		return nil, err
	}
	wrap, err := crypto.DeriveKey(password, salt, params)
	if err != nil {
		return nil, err
	}
	s, err := crypto.NewSealer(wrap[:])
	if err != nil {
		return nil, err
	}
	plain, err := json.Marshal(masterKeyJSON{Encrypt: mk.Encrypt[:], ID: mk.ID[:]})
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	uname := ""
	if u, err := user.Current(); err == nil {
		uname = u.Username
	}
	kf := keyFile{Version: 1, Created: time.Now().UTC(), Host: host, User: uname, KDF: "argon2id",
		Params: params, Salt: salt, Data: s.Seal(nil, plain, []byte(keyAD))}
	return json.MarshalIndent(kf, "", "  ")
}

func parseKeyFile(data []byte) (*keyFile, error) {
	var kf keyFile
	if err := json.Unmarshal(data, &kf); err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	if kf.Version != 1 || kf.KDF != "argon2id" || len(kf.Salt) < 16 {
		return nil, fmt.Errorf("unsupported key file (version %d, kdf %q)", kf.Version, kf.KDF)
	}
	if err := kf.Params.Validate(); err != nil {
		return nil, err
	}
	return &kf, nil
}

func openKeyFile(ctx context.Context, kf *keyFile, password []byte) (*crypto.MasterKey, error) {
	wrap, err := crypto.DeriveKeyContext(ctx, password, kf.Salt, kf.Params)
	if err != nil {
		return nil, err
	}
	s, err := crypto.NewSealer(wrap[:])
	if err != nil {
		return nil, err
	}
	plain, err := s.Open(nil, kf.Data, []byte(keyAD))
	if err != nil {
		return nil, ErrWrongPassword
	}
	var mj masterKeyJSON
	if err := json.Unmarshal(plain, &mj); err != nil || len(mj.Encrypt) != crypto.KeySize || len(mj.ID) != crypto.KeySize {
		return nil, fmt.Errorf("key file content malformed")
	}
	var mk crypto.MasterKey
	copy(mk.Encrypt[:], mj.Encrypt)
	copy(mk.ID[:], mj.ID)
	return &mk, nil
}

// namedKeyFile is a parsed key file and its object name.
type namedKeyFile struct {
	name string
	kf   *keyFile
}

// badKeyFile is a file in keys/ that is not a usable key file.
type badKeyFile struct {
	name string
	err  error
}

// joinBad joins errs and one error per bad key file, naming it.
func joinBad(errs []error, bad []badKeyFile) error {
	for _, b := range bad {
		errs = append(errs, fmt.Errorf("%s: %w", b.name, b.err))
	}
	return errors.Join(errs...)
}

// readKeyFiles lists and parses keys/. A file that does not parse (junk
// anyone with add access can create) is returned in bad with its error
// and otherwise ignored.
func readKeyFiles(ctx context.Context, be backend.Backend) (good []namedKeyFile, bad []badKeyFile, err error) {
	var names []string
	err = be.List(ctx, "keys/", func(o backend.ObjectInfo) error {
		names = append(names, o.Name)
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	sort.Strings(names)
	for _, n := range names {
		data, err := getBounded(ctx, be, n, maxSmallObject)
		if errors.Is(err, backend.ErrNotExist) {
			continue // removed meanwhile
		}
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		var kf *keyFile
		if err == nil {
			kf, err = parseKeyFile(data)
		}
		if err != nil {
			bad = append(bad, badKeyFile{name: n, err: err})
			continue
		}
		good = append(good, namedKeyFile{name: n, kf: kf})
	}
	return good, bad, nil
}

// keyHintPath is the local file that remembers which key file last
// opened the repository at be's location, so the next command tries it
// first. It lives in the cache directory, outside any repository ID
// (unknown before a key opens).
func keyHintPath(cacheDir string, be backend.Backend) string {
	if cacheDir == "" {
		cacheDir = DefaultCacheDir()
	}
	sum := sha256.Sum256([]byte(be.Location()))
	return filepath.Join(cacheDir, "key-hints", hex.EncodeToString(sum[:16]))
}

// rememberKey records name as the key file that opened the repository;
// failure only costs the ordering, so it is ignored.
func rememberKey(path, name string) {
	if path == "" {
		return
	}
	if b, err := os.ReadFile(path); err == nil && string(b) == name {
		return
	}
	if os.MkdirAll(filepath.Dir(path), 0o700) != nil {
		return
	}
	tmp := path + ".tmp"
	if os.WriteFile(tmp, []byte(name), 0o600) == nil {
		os.Rename(tmp, path)
	}
}

// orderKeyFiles sorts key files in the order to try them: the one named
// by the hint file first, then the cheapest to derive. A key file planted
// to sort first by name costs nothing while a usual key exists.
func orderKeyFiles(files []namedKeyFile, hintPath string) {
	hint := ""
	if b, err := os.ReadFile(hintPath); err == nil && len(b) < 256 {
		hint = string(b)
	}
	sort.SliceStable(files, func(i, j int) bool {
		if (files[i].name == hint) != (files[j].name == hint) {
			return files[i].name == hint
		}
		return files[i].kf.Params.Cost() < files[j].kf.Params.Cost()
	})
}

// unlock tries the key files with password, in the order orderKeyFiles
// gives. It returns the master key and the name of the key file that
// opened. A cancelled ctx ends it at once, even inside a derivation.
func unlock(ctx context.Context, be backend.Backend, password []byte, hintPath string) (*crypto.MasterKey, string, error) {
	files, bad, err := readKeyFiles(ctx, be)
	if err != nil {
		return nil, "", err
	}
	if len(files) == 0 && len(bad) == 0 {
		return nil, "", fmt.Errorf("%s: no key files: %w", be.Location(), ErrNotRepository)
	}
	if len(files) == 0 {
		return nil, "", fmt.Errorf("no usable key file: %w", joinBad(nil, bad))
	}
	orderKeyFiles(files, hintPath)
	var errs []error
	for _, f := range files {
		mk, err := openKeyFile(ctx, f.kf, password)
		if err == nil {
			return mk, f.name, nil
		}
		if ctx.Err() != nil {
			return nil, "", ctx.Err()
		}
		if !errors.Is(err, ErrWrongPassword) {
			errs = append(errs, fmt.Errorf("%s: %w", f.name, err))
		}
	}
	if len(errs) == len(files) {
		return nil, "", fmt.Errorf("no usable key file: %w", joinBad(errs, bad))
	}
	return nil, "", ErrWrongPassword
}

// ErrPasswordInUse means a new key's password already opens a key file:
// two key files with one password would make removing one of them (or
// `key passwd`) leave the password working.
var ErrPasswordInUse = errors.New("this password already opens the repository: choose another")

// keysOpenedBy returns the names of the key files that password opens to
// this repository's master key. Every key file is tried (the cost of a
// derivation each, at most MaxKDFParams).
func (r *Repository) keysOpenedBy(ctx context.Context, password []byte) ([]string, error) {
	files, _, err := readKeyFiles(ctx, r.be)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, f := range files {
		mk, err := openKeyFile(ctx, f.kf, password)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if err == nil && *mk == *r.master {
			names = append(names, f.name)
		}
	}
	return names, nil
}

// AddKey stores a new key file that opens the repository with password.
// A password that already opens a key file is refused (ErrPasswordInUse).
func (r *Repository) AddKey(ctx context.Context, password []byte, params crypto.KDFParams) (string, error) {
	if err := r.refuseUsedPassword(ctx, password); err != nil {
		return "", err
	}
	return r.storeKey(ctx, password, params)
}

func (r *Repository) refuseUsedPassword(ctx context.Context, password []byte) error {
	used, err := r.keysOpenedBy(ctx, password)
	if err != nil {
		return fmt.Errorf("check the new password against the key files: %w", err)
	}
	if len(used) > 0 {
		return fmt.Errorf("%s: %w", used[0], ErrPasswordInUse)
	}
	return nil
}

func (r *Repository) storeKey(ctx context.Context, password []byte, params crypto.KDFParams) (string, error) {
	data, err := sealMasterKey(r.master, password, params)
	if err != nil {
		return "", err
	}
	id := randomID()
	name := "keys/" + hex.EncodeToString(id[:])
	if err := r.be.Put(ctx, name, data); err != nil {
		return "", err
	}
	return hex.EncodeToString(id[:]), nil
}

// Keys lists the repository's key files. A file in keys/ that is not a
// key file is reported once (a warning naming it) and left out.
func (r *Repository) Keys(ctx context.Context) ([]KeyInfo, error) {
	files, bad, err := readKeyFiles(ctx, r.be)
	if err != nil {
		return nil, err
	}
	for _, e := range bad {
		r.warnJunk(e.name, e.err)
	}
	out := make([]KeyInfo, 0, len(files))
	for _, f := range files {
		out = append(out, KeyInfo{ID: strings.TrimPrefix(f.name, "keys/"), Current: f.name == r.keyName,
			Created: f.kf.Created, Host: f.kf.Host, User: f.kf.User})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

// RemoveKey deletes a key file given by ID or unique prefix. The key in
// use cannot be removed (that would lock this session out of its own
// repository if it were the last one).
func (r *Repository) RemoveKey(ctx context.Context, prefix string) error {
	keys, err := r.Keys(ctx)
	if err != nil {
		return err
	}
	var match []KeyInfo
	for _, k := range keys {
		if strings.HasPrefix(k.ID, prefix) {
			match = append(match, k)
		}
	}
	switch {
	case len(match) == 0 || prefix == "":
		return fmt.Errorf("no key %q", prefix)
	case len(match) > 1:
		return fmt.Errorf("key prefix %q is ambiguous", prefix)
	case match[0].Current:
		return fmt.Errorf("key %s is the one in use: open the repository with another key to remove it", match[0].ID[:8])
	}
	return r.be.Delete(ctx, "keys/"+match[0].ID)
}

// ChangePassword replaces the password the repository was opened with:
// it adds a key file for the new password and removes every key file the
// old password opens (not only the one in use: with two, the old password
// would still work). A new password already in use is refused.
func (r *Repository) ChangePassword(ctx context.Context, password []byte, params crypto.KDFParams) (string, error) {
	if err := r.refuseUsedPassword(ctx, password); err != nil {
		return "", err
	}
	old, err := r.keysOpenedBy(ctx, r.password)
	if err != nil {
		return "", fmt.Errorf("find the key files of the old password: %w", err)
	}
	id, err := r.storeKey(ctx, password, params)
	if err != nil {
		return "", err
	}
	for _, n := range old {
		if err := r.be.Delete(ctx, n); err != nil && !errors.Is(err, backend.ErrNotExist) {
			return id, fmt.Errorf("new key %s added, but removing the old key %s failed (the old password still opens the repository): %w", id[:8], n, err)
		}
	}
	r.keyName = "keys/" + id
	r.password = bytes.Clone(password)
	return id, nil
}
