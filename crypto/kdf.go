package crypto

import (
	"context"
	"crypto/rand"
	"fmt"
	"runtime"
	"time"

	"golang.org/x/crypto/argon2"
)

// KDFParams are argon2id parameters. They are stored beside each wrapped
// key so that a key file opens with the parameters it was made with.
type KDFParams struct {
	Time    uint32 `json:"time"`
	Memory  uint32 `json:"memory_kib"`
	Threads uint8  `json:"threads"`
}

// MinKDFParams are the weakest parameters Derive accepts from a key file;
// anything below is refused as tampered with.
var MinKDFParams = KDFParams{Time: 1, Memory: 8 * 1024, Threads: 1}

// MaxKDFParams are the most expensive parameters accepted: what
// CalibrateKDF can produce (64 MiB, at most 50 passes, at most 4 lanes),
// which is all that `init` and `key add` write. Anyone who can add a file
// to keys/ can plant a key file, and every command tries key files until
// one opens: accepting more would let such a file cost each command
// minutes and gigabytes (t=100, m=4 GiB was accepted once).
var MaxKDFParams = KDFParams{Time: 50, Memory: 64 * 1024, Threads: 4}

// Validate rejects parameters that are too weak or more expensive than a
// key vmvault writes.
func (p KDFParams) Validate() error {
	if p.Time < MinKDFParams.Time || p.Memory < MinKDFParams.Memory || p.Threads < MinKDFParams.Threads {
		return fmt.Errorf("argon2id parameters too weak (t=%d m=%dKiB p=%d)", p.Time, p.Memory, p.Threads)
	}
	if p.Time > MaxKDFParams.Time || p.Memory > MaxKDFParams.Memory || p.Threads > MaxKDFParams.Threads {
		return fmt.Errorf("argon2id parameters out of range (t=%d m=%dKiB p=%d; at most t=%d m=%dKiB p=%d)",
			p.Time, p.Memory, p.Threads, MaxKDFParams.Time, MaxKDFParams.Memory, MaxKDFParams.Threads)
	}
	return nil
}

// Cost is a relative measure of the work of one derivation (passes ×
// memory), for trying cheap key files first.
func (p KDFParams) Cost() uint64 { return uint64(p.Time) * uint64(p.Memory) }

// DeriveKey stretches a password into a 32-byte key.
func DeriveKey(password, salt []byte, p KDFParams) ([KeySize]byte, error) {
	var k [KeySize]byte
	if err := p.Validate(); err != nil {
		return k, err
	}
	copy(k[:], idKey(password, salt, p))
	return k, nil
}

// idKey runs argon2id on heap memory that is already resident.
//
// argon2's first pass XORs each new block into its (zero) slot: on fresh
// memory every 4 KiB page is first read (the kernel maps its shared zero
// page) and then written, a copy-on-write fault that flushes the page
// from every CPU's TLB. On a 2-core virtual machine those 16,384
// faults for 64 MiB took 0.23 s of a 0.25 s derivation (t=1, p=2),
// about ten times argon2's own work, and made the
// calibration of round 1 settle on a single pass. Writing one byte of
// each page of a heap object of the same size first (a plain fault, no
// flush), freeing it and collecting lets argon2's allocation reuse those
// pages. The result does not depend on this; only the time does
// (BenchmarkDeriveKey, TestDeriveKeyFaultsLittle).
func idKey(password, salt []byte, p KDFParams) []byte {
	warmHeap(int(p.Memory) * 1024)
	return argon2.IDKey(password, salt, p.Time, p.Memory, p.Threads, KeySize)
}

// warmHeap leaves n bytes of the Go heap resident and free.
func warmHeap(n int) {
	b := make([]byte, n)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	runtime.KeepAlive(b)
	b = nil
	runtime.GC()
}

// DeriveKeyContext is DeriveKey that returns ctx's error as soon as ctx
// is done. argon2 cannot be stopped midway: the derivation finishes in
// the background and its result is dropped, so a SIGINT during a slow
// derivation ends the command at once instead of after it.
func DeriveKeyContext(ctx context.Context, password, salt []byte, p KDFParams) ([KeySize]byte, error) {
	if err := ctx.Err(); err != nil {
		return [KeySize]byte{}, err
	}
	type result struct {
		k   [KeySize]byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		k, err := DeriveKey(password, salt, p)
		done <- result{k, err}
	}()
	select {
	case r := <-done:
		return r.k, r.err
	case <-ctx.Done():
		return [KeySize]byte{}, ctx.Err()
	}
}

// NewSalt returns 32 random bytes.
func NewSalt() ([]byte, error) {
	s := make([]byte, 32)
	if _, err := rand.Read(s); err != nil {
		return nil, err
	}
	return s, nil
}

// DefaultKDFParams are what `init` and `key add` write unless told
// otherwise: RFC 9106's "uniformly safe option" when much less than
// 2 GiB of memory is available (argon2id, t=3, p=4, 64 MiB).
var DefaultKDFParams = KDFParams{Time: 3, Memory: 64 * 1024, Threads: 4}

// CalibrateKDF picks argon2id parameters that take about target on this
// machine: 64 MiB of memory, 4 lanes, and as many passes as fit, never
// fewer than DefaultKDFParams' (for --kdf-params=calibrate).
func CalibrateKDF(target time.Duration) KDFParams {
	p := KDFParams{Time: 1, Memory: DefaultKDFParams.Memory, Threads: DefaultKDFParams.Threads}
	salt := make([]byte, 32)
	start := time.Now()
	idKey([]byte("calibration"), salt, p)
	one := time.Since(start)
	if one <= 0 {
		one = time.Millisecond
	}
	t := uint32(target / one)
	p.Time = max(DefaultKDFParams.Time, min(t, MaxKDFParams.Time))
	return p
}
