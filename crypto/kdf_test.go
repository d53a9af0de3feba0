package crypto

import (
	"bytes"
	"runtime/debug"
	"syscall"
	"testing"

	"golang.org/x/crypto/argon2"
)

// minorFaults is the process's count of minor page faults so far.
func minorFaults(t testing.TB) int64 {
	var r syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &r); err != nil {
		t.Fatal(err)
	}
	return r.Minflt
}

// TestDeriveKeyFaultsLittle: argon2 on fresh memory took a
// copy-on-write fault (and a TLB flush on every CPU) for each of the
// 16,384 pages of 64 MiB, ten times the derivation's own work on a
// 2-core virtual machine. With the heap warmed first, argon2's memory is
// already resident: the derivation itself faults far fewer pages. The
// count is of faults, not time; the key is unchanged.
func TestDeriveKeyFaultsLittle(t *testing.T) {
	p := KDFParams{Time: 1, Memory: 64 * 1024, Threads: 2}
	salt := bytes.Repeat([]byte{7}, 32)
	debug.FreeOSMemory() // a cold heap, as in a new process
	warmHeap(int(p.Memory) * 1024)
	before := minorFaults(t)
	got := argon2.IDKey([]byte("pw"), salt, p.Time, p.Memory, p.Threads, KeySize)
	faults := minorFaults(t) - before
	debug.FreeOSMemory()
	want := argon2.IDKey([]byte("pw"), salt, p.Time, p.Memory, p.Threads, KeySize)
	if !bytes.Equal(got, want) {
		t.Fatal("argon2 on warmed memory derived a different key")
	}
	pages := int64(p.Memory) * 1024 / 4096
	t.Logf("%d minor faults for %d pages of argon2 memory", faults, pages)
	if raceEnabled {
		t.Log("race detector: its shadow memory faults too; the fault count is not checked")
	} else if faults > pages/4 {
		t.Fatalf("argon2 took %d minor faults on %d pages of warmed memory: the heap was not reused", faults, pages)
	}
	k, err := DeriveKey([]byte("pw"), salt, p)
	if err != nil || !bytes.Equal(k[:], want) {
		t.Fatalf("DeriveKey = %x, %v; want %x", k, err, want)
	}
}

// BenchmarkDeriveKey compares the default parameters' derivation on
// fresh memory (argon2 alone, after the heap's free pages went back to
// the kernel, as in a new process)
// and through DeriveKey.
func BenchmarkDeriveKey(b *testing.B) {
	p := DefaultKDFParams
	salt := bytes.Repeat([]byte{7}, 32)
	b.Run("argon2", func(b *testing.B) {
		for b.Loop() {
			debug.FreeOSMemory()
			before := minorFaults(b)
			argon2.IDKey([]byte("pw"), salt, p.Time, p.Memory, p.Threads, KeySize)
			b.ReportMetric(float64(minorFaults(b)-before), "faults/op")
		}
	})
	b.Run("DeriveKey", func(b *testing.B) {
		for b.Loop() {
			debug.FreeOSMemory()
			before := minorFaults(b)
			if _, err := DeriveKey([]byte("pw"), salt, p); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(minorFaults(b)-before), "faults/op")
		}
	})
}
