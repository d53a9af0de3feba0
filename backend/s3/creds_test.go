package s3

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vmvault/backend/retry"
	"vmvault/internal/testminio"
)

// Credentials come from the environment first, then the configuration,
// then the shared credentials file's profile; none at all is one clear
// error naming every source.
func TestCredentialSources(t *testing.T) {
	s := testminio.Start(t, testminio.Options{})
	cfg := rootConfig(t, s, "") // clears AWS_* in the environment
	ctx := context.Background()
	open(t, cfg) // configuration keys; creates the bucket
	cfg.Create = false

	// Environment wins over wrong configuration keys.
	t.Setenv("AWS_ACCESS_KEY_ID", s.RootUser)
	t.Setenv("AWS_SECRET_ACCESS_KEY", s.RootPassword)
	wrong := cfg
	wrong.AccessKeyID, wrong.SecretAccessKey = "nobody", "wrong-secret-0123"
	if _, err := Open(ctx, wrong); err != nil {
		t.Fatalf("environment credentials did not win over the configuration's: %v", err)
	}
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	if _, err := Open(ctx, cfg); err == nil || !strings.Contains(err.Error(), "both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") {
		t.Fatalf("half the environment's credentials: %v", err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", "")

	// The shared credentials file, profile from AWS_PROFILE.
	file := filepath.Join(t.TempDir(), "credentials")
	text := fmt.Sprintf("[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong-secret-0123\n\n[vmvault]\naws_access_key_id = %s\naws_secret_access_key = %s\n", s.RootUser, s.RootPassword)
	if err := os.WriteFile(file, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", file)
	t.Setenv("AWS_PROFILE", "vmvault")
	fromFile := cfg
	fromFile.AccessKeyID, fromFile.SecretAccessKey = "", ""
	if _, err := Open(ctx, fromFile); err != nil {
		t.Fatalf("shared credentials file, profile vmvault: %v", err)
	}
	// The configuration's profile when AWS_PROFILE is unset.
	t.Setenv("AWS_PROFILE", "")
	fromFile.Profile = "vmvault"
	if _, err := Open(ctx, fromFile); err != nil {
		t.Fatalf("shared credentials file, profile from the configuration: %v", err)
	}
	fromFile.Profile = "missing"
	_, err := Open(ctx, fromFile)
	if err == nil || !strings.Contains(err.Error(), "no s3 credentials") || !strings.Contains(err.Error(), `profile "missing"`) {
		t.Fatalf("no credentials anywhere: %v", err)
	}
}

// An https endpoint whose certificate a private CA signed: trusted with
// CAFile, refused without it (at once: a certificate error is not worth
// retrying).
func TestCustomCA(t *testing.T) {
	s := testminio.Start(t, testminio.Options{TLS: true})
	cfg := rootConfig(t, s, "/p")
	if !strings.HasPrefix(cfg.URL, "s3:https://") {
		t.Fatalf("url %s", cfg.URL)
	}
	_, err := Open(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("open without the CA: %v, want a certificate error", err)
	}
	if retry.Transient(err) {
		t.Fatalf("a certificate error is marked transient: %v", err)
	}
	cfg.CAFile = s.CAFile
	b := open(t, cfg)
	if err := b.Put(context.Background(), "config", []byte("over tls")); err != nil {
		t.Fatal(err)
	}
	cfg.CAFile = filepath.Join(t.TempDir(), "empty.pem")
	os.WriteFile(cfg.CAFile, []byte("not pem"), 0o600)
	if _, err := Open(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "no PEM certificates") {
		t.Fatalf("a CA file without certificates: %v", err)
	}
}
