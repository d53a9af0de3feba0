// Package sshkey holds what the SFTP backend and the guest quiescer share
// about SSH: reading a private key file safely, and choosing host key
// algorithms that known_hosts can verify.
package sshkey

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// ReadPrivateKey parses an unencrypted private key file, refusing one that
// group or others can access: a leaked backup or guest key opens every
// backup or every guest.
func ReadPrivateKey(path string) (ssh.Signer, error) {
	if path == "" {
		return nil, errors.New("no SSH key file configured")
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("SSH key file: %w", err)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("SSH key file %s is accessible by group or others (mode %04o): chmod 600 %s", path, perm, path)
	}
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("SSH key file: %w", err)
	}
	s, err := ssh.ParsePrivateKey(pem)
	var pm *ssh.PassphraseMissingError
	if errors.As(err, &pm) {
		return nil, fmt.Errorf("SSH key file %s is protected by a passphrase: unattended runs need an unencrypted key, or the key loaded into ssh-agent", path)
	}
	if err != nil {
		return nil, fmt.Errorf("SSH key file %s: %w", path, err)
	}
	return s, nil
}

// KnownAlgorithms lists the host key algorithms of the keys that known
// (a known_hosts callback) holds for addr, so that the server is asked for
// a key that can be verified rather than its preferred type, which
// known_hosts may not list (a false mismatch). Nil means no preference.
func KnownAlgorithms(known ssh.HostKeyCallback, addr string) []string {
	err := known(addr, &net.TCPAddr{}, probeKey{})
	var ke *knownhosts.KeyError
	if !errors.As(err, &ke) {
		return nil
	}
	var algos []string
	for _, k := range ke.Want {
		if t := k.Key.Type(); t == ssh.KeyAlgoRSA {
			algos = append(algos, ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA)
		} else {
			algos = append(algos, t)
		}
	}
	return algos
}

// probeKey is a public key of a type no known_hosts file contains: asking
// knownhosts about it makes it list the keys it has for a host.
type probeKey struct{}

func (probeKey) Type() string                        { return "vmvault-probe" }
func (probeKey) Marshal() []byte                     { return []byte("vmvault-probe") }
func (probeKey) Verify([]byte, *ssh.Signature) error { return errors.New("probe key") }
