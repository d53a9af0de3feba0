package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"vmvault/crypto"
)

// plantKey writes a key file that parses but that no password opens,
// with the given argon2id parameters.
func plantKey(t *testing.T, e *env, id string, p crypto.KDFParams) {
	t.Helper()
	salt, _ := crypto.NewSalt()
	b, _ := json.Marshal(map[string]any{"version": 1, "created": time.Now().UTC(), "kdf": "argon2id",
		"params": p, "salt": salt, "data": bytes.Repeat([]byte{1}, 80)})
	if err := os.WriteFile(filepath.Join(e.repo, "keys", id), b, 0o444); err != nil {
		t.Fatal(err)
	}
}

// procRSS returns a process's resident memory in KiB.
func procRSS(pid int) int {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.Atoi(f[1])
			return kb
		}
	}
	return 0
}

// SIGINT while a key file is being derived ends the command at once
// with exit 130; before, the derivation ran to its end and the command
// reported "wrong password" (exit 12).
func TestInterruptDuringKeyDerivation(t *testing.T) {
	e := newEnv(t)
	plantKey(t, e, strings.Repeat("f", 64), crypto.MaxKDFParams)
	wrong := filepath.Join(e.dir, "wrong")
	os.WriteFile(wrong, []byte("not the password\n"), 0o600)
	cmd := helper(e, "--password-file", wrong, "snapshots")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The planted key's derivation holds MaxKDFParams.Memory: wait for
	// the child to be inside it.
	deadline := time.Now().Add(30 * time.Second)
	for procRSS(cmd.Process.Pid) < int(crypto.MaxKDFParams.Memory)/2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGINT)
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitInterrupted {
		t.Fatalf("exit %v (want %d): %s", err, exitInterrupted, stderr.String())
	}
	if strings.Contains(stderr.String(), "wrong password") {
		t.Fatalf("interrupt reported as a wrong password: %s", stderr.String())
	}
}

// Junk in keys/ does not break key list or key remove; key add refuses a
// password that already opens the repository.
func TestKeyCommandsWithJunkAndReusedPassword(t *testing.T) {
	e := newEnv(t)
	os.WriteFile(filepath.Join(e.repo, "keys", "x"), []byte("junk"), 0o444)
	r := e.ok("key", "list", "--json")
	var keys []struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &keys); err != nil || len(keys) != 1 {
		t.Fatalf("key list with junk: %v %s", err, r.stdout)
	}
	if strings.Count(r.stderr, "keys/x") != 1 {
		t.Fatalf("junk not reported once: %q", r.stderr)
	}
	e.fails(exitError, "already opens the repository", "key", "add", "--new-password-file", e.pw, "--kdf-params", "t=1,m=8192,p=1")
	second := filepath.Join(e.dir, "second")
	os.WriteFile(second, []byte("second\n"), 0o600)
	e.ok("key", "add", "--new-password-file", second, "--kdf-params", "t=1,m=8192,p=1")
	r = e.ok("key", "list", "--json")
	json.Unmarshal([]byte(r.stdout), &keys)
	if len(keys) != 2 {
		t.Fatalf("keys: %s", r.stdout)
	}
	e.ok("--password-file", second, "key", "remove", keys[0].ID[:8])
	e.fails(exitWrongPass, "wrong password", "snapshots")
	e.fails(exitUsage, "out of range", "key", "add", "--password-file", second, "--new-password-file", e.pw, "--kdf-params", "t=51,m=8192,p=1")
}
