package sftp

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"vmvault/backend/backendtest"
	"vmvault/backend/local"
	"vmvault/internal/testsshd"
)

// BenchmarkPut uploads 256 objects of 1 MiB from 8 goroutines, to the
// local backend and over loopback SFTP, so the two MB/s figures can be
// compared (the SFTP target is at least 1/1.3 of local).
func BenchmarkPut(b *testing.B) {
	run := backendtest.BenchPut
	b.Run("local", func(b *testing.B) {
		be, err := local.Create(filepath.Join(b.TempDir(), "repo"))
		if err != nil {
			b.Fatal(err)
		}
		run(b, be)
	})
	for _, conns := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("sftp/conns=%d", conns), func(b *testing.B) {
			s := testsshd.Start(b, testsshd.Options{})
			cfg := serverConfig(s, filepath.Join(b.TempDir(), "repo"))
			cfg.Create = true
			cfg.Connections = conns
			be, err := Open(context.Background(), cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer be.Close()
			run(b, be)
		})
	}
}
