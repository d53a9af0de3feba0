package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"vmvault/crypto"
	"vmvault/repo"
)

func (a *app) initCommand() *cobra.Command {
	var kdf string
	var segSize int64
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create a new repository",
		Long: `Create a new, empty repository at --repo, protected by the password in
--password-file (or typed twice on a terminal). The password is stretched
with argon2id (about 0.5 s); keep it safe: without it nothing can be restored.`,
		Example: `  vmvault init --repo /srv/vmvault --password-file /etc/vmvault/password
  vmvault init --repo sftp://backup@backupserver/srv/vmvault --ssh-key /root/.ssh/backup`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			params, err := parseKDF(kdf)
			if err != nil {
				return withCode(exitUsage, err)
			}
			pw, err := a.password("new repository password", promptTwice)
			if err != nil {
				return err
			}
			be, err := a.openBackend(cmd.Context(), newRepository)
			if err != nil {
				return err
			}
			defer be.Close()
			r, err := repo.Init(cmd.Context(), be, pw, repo.Options{CacheDir: a.cacheDir, Logger: a.log, KDF: params, SegmentSize: segSize})
			if err != nil {
				return err
			}
			defer r.Close()
			if a.jsonOut {
				return printJSON(a.stdout, map[string]any{"id": r.Config().ID, "location": be.Location()})
			}
			fmt.Fprintf(a.stderr, "created repository %s at %s\n", r.Config().ID[:8], be.Location())
			return nil
		},
	}
	cmd.Flags().StringVar(&kdf, "kdf-params", "", "argon2id parameters t=PASSES,m=KIB,p=THREADS, or calibrate (about 0.5 s here) (default t=3,m=65536,p=4, RFC 9106)")
	cmd.Flags().Int64Var(&segSize, "segment-size", 0, "segment size in bytes (default 8 MiB)")
	cmd.Flags().MarkHidden("kdf-params")
	cmd.Flags().MarkHidden("segment-size")
	return cmd
}

// parseKDF parses "t=1,m=8192,p=1" or "calibrate" (as many passes as
// take about 0.5 s here, at least the default's); empty means the
// default (crypto.DefaultKDFParams).
func parseKDF(s string) (crypto.KDFParams, error) {
	var p crypto.KDFParams
	switch s {
	case "":
		return crypto.DefaultKDFParams, nil
	case "calibrate":
		return crypto.CalibrateKDF(500 * time.Millisecond), nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		n, err := strconv.ParseUint(v, 10, 32)
		if !ok || err != nil {
			return p, fmt.Errorf("bad --kdf-params %q", s)
		}
		switch k {
		case "t":
			p.Time = uint32(n)
		case "m":
			p.Memory = uint32(n)
		case "p":
			p.Threads = uint8(n)
		default:
			return p, fmt.Errorf("bad --kdf-params key %q", k)
		}
	}
	if err := p.Validate(); err != nil {
		return p, errors.New("--kdf-params: " + err.Error())
	}
	return p, nil
}
