package backendtest

import (
	"context"
	"encoding/binary"
	"sync"
	"sync/atomic"
	"testing"

	"vmvault/backend"
)

// Benchmark workload: 256 objects of 1 MiB from 8 goroutines, the shape
// of a backup's uploads and a restore's fetches.
const (
	benchObjects = 256
	benchSize    = 1 << 20
	benchWorkers = 8
)

// parallel runs fn(i) for i in [0, benchObjects) on benchWorkers goroutines.
func parallel(b *testing.B, fn func(data []byte, i int64) error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, benchWorkers)
	for range benchWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data := make([]byte, benchSize)
			for {
				i := next.Add(1) - 1
				if i >= benchObjects {
					return
				}
				if err := fn(data, i); err != nil {
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

// BenchPut measures uploads of new objects into be (MB/s by b.SetBytes).
func BenchPut(b *testing.B, be backend.Backend) {
	ctx := context.Background()
	payload := RandomBytes(b, benchSize)
	b.SetBytes(benchObjects * benchSize)
	b.ReportAllocs()
	var round atomic.Uint64
	for b.Loop() {
		r := round.Add(1)
		parallel(b, func(data []byte, i int64) error {
			copy(data, payload)
			// Distinct content and name per object.
			binary.LittleEndian.PutUint64(data, r)
			binary.LittleEndian.PutUint64(data[8:], uint64(i))
			return be.Put(ctx, DataName(data), data)
		})
	}
}

// BenchGet measures whole-object reads of objects stored beforehand.
func BenchGet(b *testing.B, be backend.Backend) {
	ctx := context.Background()
	payload := RandomBytes(b, benchSize)
	names := make([]string, benchObjects)
	parallel(b, func(data []byte, i int64) error {
		copy(data, payload)
		binary.LittleEndian.PutUint64(data, ^uint64(0))
		binary.LittleEndian.PutUint64(data[8:], uint64(i))
		names[i] = DataName(data)
		return be.Put(ctx, names[i], data)
	})
	b.SetBytes(benchObjects * benchSize)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		parallel(b, func(_ []byte, i int64) error {
			_, err := be.Get(ctx, names[i], 0, -1)
			return err
		})
	}
}
