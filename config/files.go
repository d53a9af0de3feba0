package config

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// maxSecretSize bounds what ReadSecretFile reads: a password file of
// megabytes is a mistake (the wrong file), not a password.
const maxSecretSize = 64 << 10

// ReadSecretFile reads a password file: the one implementation for every
// secret vmvault reads (--password-file, [repository] password_file, the
// databases' password_file). It refuses a file that is not regular or
// that group or others can access (the configuration may have been
// checked long ago), and one larger than 64 KiB; it trims trailing line
// breaks ("\n", "\r\n") and refuses an empty secret. Errors name the
// file, never its content.
func ReadSecretFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read secret: %w", err)
	}
	defer f.Close()
	// Stat the open file, not the path, so the checked file is the read one.
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("read secret: %w", err)
	}
	if err := checkPrivate(path, fi); err != nil {
		return "", fmt.Errorf("read secret: %w", err)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxSecretSize+1))
	if err != nil {
		return "", fmt.Errorf("read secret %s: %w", path, err)
	}
	if len(data) > maxSecretSize {
		return "", fmt.Errorf("read secret %s: larger than %d bytes, not a password file", path, maxSecretSize)
	}
	// Every trailing line break goes: --password-file always trimmed
	// them all, and a repository made with such a file must still open.
	s := strings.TrimRight(string(data), "\r\n")
	if s == "" {
		return "", fmt.Errorf("read secret %s: the file is empty", path)
	}
	return s, nil
}

// checkPrivate refuses a secret that is not a regular file or that group
// or others may access in any way (ssh refuses such keys for the same
// reason: anyone who can read it, or replace it, owns the backups).
func checkPrivate(path string, fi fs.FileInfo) error {
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%s is accessible by group or others (mode %04o): chmod 600 %s", path, perm, path)
	}
	return nil
}

// absPath reports a relative path: vmvault runs from cron, whose working
// directory nobody chooses.
func (d *doc) absPath(n node, p string) (string, bool) {
	if !filepath.IsAbs(p) {
		d.errorf(n, "%q: want an absolute path", p)
		return p, false
	}
	return p, true
}

// existingFile checks that p exists and can be read.
func (d *doc) existingFile(n node, p string) string {
	if _, ok := d.absPath(n, p); !ok || d.opts.SkipFileChecks {
		return p
	}
	if _, err := statReadable(p); err != nil {
		d.errorf(n, "%v", err)
	}
	return p
}

// secretFile checks that p exists, can be read, and is private.
func (d *doc) secretFile(n node, p string) string {
	if _, ok := d.absPath(n, p); !ok || d.opts.SkipFileChecks {
		return p
	}
	fi, err := statReadable(p)
	if err == nil {
		err = checkPrivate(p, fi)
	}
	if err != nil {
		d.errorf(n, "%v", err)
	}
	return p
}

// statReadable stats p and, for regular files and block devices, opens it
// for reading (never other kinds: opening a FIFO would block).
func statReadable(p string) (fs.FileInfo, error) {
	fi, err := os.Stat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s does not exist", p)
	}
	if err != nil {
		return nil, err
	}
	m := fi.Mode()
	if !m.IsRegular() && !(m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0) {
		return nil, fmt.Errorf("%s is not a regular file or block device", p)
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("cannot read %s: %w", p, errors.Unwrap(err))
	}
	f.Close()
	return fi, nil
}
