package repo

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/user"
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

func openKeyFile(kf *keyFile, password []byte) (*crypto.MasterKey, error) {
	wrap, err := crypto.DeriveKey(password, kf.Salt, kf.Params)
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

// unlock tries every key file with password. It returns the master key and
// the name of the key file that opened.
func unlock(ctx context.Context, be backend.Backend, password []byte) (*crypto.MasterKey, string, error) {
	var names []string
	err := be.List(ctx, "keys/", func(o backend.ObjectInfo) error {
		names = append(names, o.Name)
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	if len(names) == 0 {
		return nil, "", fmt.Errorf("%s: no key files: %w", be.Location(), ErrNotRepository)
	}
	sort.Strings(names)
	var errs []error
	for _, n := range names {
		data, err := getBounded(ctx, be, n, maxSmallObject)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		kf, err := parseKeyFile(data)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
			continue
		}
		mk, err := openKeyFile(kf, password)
		if err == nil {
			return mk, n, nil
		}
		if !errors.Is(err, ErrWrongPassword) {
			errs = append(errs, fmt.Errorf("%s: %w", n, err))
		}
	}
	if len(errs) > 0 && len(errs) == len(names) {
		return nil, "", fmt.Errorf("no usable key file: %w", errors.Join(errs...))
	}
	return nil, "", ErrWrongPassword
}

// AddKey stores a new key file that opens the repository with password.
func (r *Repository) AddKey(ctx context.Context, password []byte, params crypto.KDFParams) (string, error) {
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

// Keys lists the repository's key files.
func (r *Repository) Keys(ctx context.Context) ([]KeyInfo, error) {
	var out []KeyInfo
	err := r.be.List(ctx, "keys/", func(o backend.ObjectInfo) error {
		data, err := getBounded(ctx, r.be, o.Name, maxSmallObject)
		if err != nil {
			return err
		}
		kf, err := parseKeyFile(data)
		if err != nil {
			return fmt.Errorf("%s: %w", o.Name, err)
		}
		out = append(out, KeyInfo{ID: strings.TrimPrefix(o.Name, "keys/"), Current: o.Name == r.keyName,
			Created: kf.Created, Host: kf.Host, User: kf.User})
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, err
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

// ChangePassword replaces the key in use with one for a new password.
func (r *Repository) ChangePassword(ctx context.Context, password []byte, params crypto.KDFParams) (string, error) {
	id, err := r.AddKey(ctx, password, params)
	if err != nil {
		return "", err
	}
	if err := r.be.Delete(ctx, r.keyName); err != nil {
		return id, fmt.Errorf("new key %s added, but removing the old key failed: %w", id[:8], err)
	}
	r.keyName = "keys/" + id
	return id, nil
}
