package sshkey

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

func writeKey(t *testing.T, mode os.FileMode, passphrase string) string {
	t.Helper()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	var block *pem.Block
	var err error
	if passphrase == "" {
		block, err = ssh.MarshalPrivateKey(priv, "")
	} else {
		block, err = ssh.MarshalPrivateKeyWithPassphrase(priv, "", []byte(passphrase))
	}
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(path, pem.EncodeToMemory(block), mode); err != nil {
		t.Fatal(err)
	}
	os.Chmod(path, mode)
	return path
}

func TestReadPrivateKey(t *testing.T) {
	if _, err := ReadPrivateKey(writeKey(t, 0o600, "")); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		path string
		want string
	}{
		"readable by others": {writeKey(t, 0o644, ""), "chmod 600"},
		"group readable":     {writeKey(t, 0o640, ""), "chmod 600"},
		"passphrase":         {writeKey(t, 0o600, "secret"), "passphrase"},
		"missing":            {filepath.Join(t.TempDir(), "nope"), "no such file"},
		"empty path":         {"", "no SSH key file"},
	} {
		if _, err := ReadPrivateKey(c.path); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want %q", name, err, c.want)
		}
	}
}

func TestKnownAlgorithms(t *testing.T) {
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	k, _ := ssh.NewPublicKey(pub)
	file := filepath.Join(t.TempDir(), "known_hosts")
	os.WriteFile(file, []byte(knownhosts.Line([]string{"[127.0.0.1]:2222"}, k)+"\n"), 0o600)
	known, err := knownhosts.New(file)
	if err != nil {
		t.Fatal(err)
	}
	if got := KnownAlgorithms(known, "127.0.0.1:2222"); len(got) != 1 || got[0] != ssh.KeyAlgoED25519 {
		t.Fatalf("known host: %v", got)
	}
	if got := KnownAlgorithms(known, "127.0.0.1:2223"); got != nil {
		t.Fatalf("unknown host: %v", got)
	}
}
