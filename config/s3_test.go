package config

import (
	"strings"
	"testing"
)

// The [repository] s3_* keys: read for an s3: url, refused for others,
// checked for range and pairing.
func TestS3Keys(t *testing.T) {
	good := `[repository]
url = "s3:http://127.0.0.1:9000/vmvault/host1"
password_file = "/etc/vmvault/password"
s3_access_key_id = "host1"
s3_secret_access_key_file = "/etc/vmvault/s3-secret"
s3_region = "eu-central-1"
s3_ca_file = "/etc/vmvault/ca.pem"
s3_path_style = true
s3_object_lock_days = 30
`
	cfg, err := Parse("t.toml", []byte(good), Options{SkipFileChecks: true})
	if err != nil {
		t.Fatal(err)
	}
	r := cfg.Repository
	if r.S3AccessKeyID != "host1" || r.S3SecretAccessKeyFile != "/etc/vmvault/s3-secret" || r.S3Region != "eu-central-1" ||
		r.S3CAFile != "/etc/vmvault/ca.pem" || !r.S3PathStyle || r.S3ObjectLockDays != 30 {
		t.Fatalf("s3 keys read as %+v", r)
	}
	for _, tc := range []struct{ text, want string }{
		{strings.Replace(good, "s3:http://127.0.0.1:9000/vmvault/host1", "/srv/vmvault", 1), "only used with an s3: url"},
		{strings.Replace(good, "s3_object_lock_days = 30", "s3_object_lock_days = 0", 1), "from 1 to 36500"},
		{strings.Replace(good, `s3_access_key_id = "host1"`, "", 1), "go together"},
		{strings.Replace(good, "s3:http://127.0.0.1:9000/vmvault/host1", "s3:http://127.0.0.1:9000", 1), "want s3:https://HOST"},
		{strings.Replace(good, "s3:http://", "s3:ftp://", 1), "want s3:https://HOST"},
	} {
		_, err := Parse("t.toml", []byte(tc.text), Options{SkipFileChecks: true})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config with a bad s3 key: %v, want %q", err, tc.want)
		}
	}
}
