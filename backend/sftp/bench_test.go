package sftp

import (
	"context"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"vmvault/backend"
	"vmvault/backend/backendtest"
	"vmvault/backend/local"
	"vmvault/internal/testsshd"
)

// BenchmarkPut uploads 256 objects of 1 MiB from 8 goroutines, to the
// local backend and over loopback SFTP, so the two MB/s figures can be
// compared (the SFTP target is at least 1/1.3 of local).
func BenchmarkPut(b *testing.B) {
	const (
		objects = 256
		size    = 1 << 20
		workers = 8
	)
	payload := backendtest.RandomBytes(b, size)
	run := func(b *testing.B, be backend.Backend) {
		ctx := context.Background()
		b.SetBytes(objects * size)
		b.ReportAllocs()
		var round atomic.Uint64
		for b.Loop() {
			r := round.Add(1)
			var next atomic.Int64
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					data := make([]byte, size)
					copy(data, payload)
					for {
						i := next.Add(1) - 1
						if i >= objects {
							return
						}
						// Distinct content and name per object.
						binary.LittleEndian.PutUint64(data, r)
						binary.LittleEndian.PutUint64(data[8:], uint64(i))
						if err := be.Put(ctx, backendtest.DataName(data), data); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			if err := <-errs; err != nil {
				b.Fatal(err)
			}
		}
	}
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
