package crypto

import (
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

// Validate rejects parameters that are too weak or absurdly large (a
// damaged or forged key file must not make us allocate terabytes).
func (p KDFParams) Validate() error {
	if p.Time < MinKDFParams.Time || p.Memory < MinKDFParams.Memory || p.Threads < 1 {
		return fmt.Errorf("argon2id parameters too weak (t=%d m=%dKiB p=%d)", p.Time, p.Memory, p.Threads)
	}
	if p.Time > 100 || p.Memory > 4*1024*1024 {
		return fmt.Errorf("argon2id parameters out of range (t=%d m=%dKiB)", p.Time, p.Memory)
	}
	return nil
}

// DeriveKey stretches a password into a 32-byte key.
func DeriveKey(password, salt []byte, p KDFParams) ([KeySize]byte, error) {
	var k [KeySize]byte
	if err := p.Validate(); err != nil {
		return k, err
	}
	copy(k[:], argon2.IDKey(password, salt, p.Time, p.Memory, p.Threads, KeySize))
	return k, nil
}

// NewSalt returns 32 random bytes.
func NewSalt() ([]byte, error) {
	s := make([]byte, 32)
	if _, err := rand.Read(s); err != nil {
		return nil, err
	}
	return s, nil
}

// CalibrateKDF picks argon2id parameters that take about target on this
// machine: 64 MiB of memory, and as many passes as fit (at least 1).
func CalibrateKDF(target time.Duration) KDFParams {
	p := KDFParams{Time: 1, Memory: 64 * 1024, Threads: uint8(min(runtime.NumCPU(), 4))}
	salt := make([]byte, 32)
	start := time.Now()
	argon2.IDKey([]byte("calibration"), salt, p.Time, p.Memory, p.Threads, KeySize)
	one := time.Since(start)
	if one <= 0 {
		one = time.Millisecond
	}
	t := uint32(target / one)
	p.Time = max(1, min(t, 50))
	return p
}
