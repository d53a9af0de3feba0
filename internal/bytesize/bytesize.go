// Package bytesize parses and formats byte counts with binary units, the
// one implementation of both for the whole tree (configuration sizes,
// messages, summaries).
//
// Parse requires a unit: lvcreate reads a bare number as MiB, a common
// surprise, so "2048" is refused rather than guessed. Units are 1024-based
// as in LVM: K, M, G, T, P, each optionally followed by "iB" or "B"; "b"
// is bytes.
package bytesize

import (
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
)

// sizeRE matches a number and a binary unit: "2G", "512M", "1.5GiB", "4096b".
var sizeRE = regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?)\s*([bBkKmMgGtTpP])(?:i?[bB])?$`)

// Max is the largest size Parse accepts.
const Max = 1 << 62

// Parse parses a size such as "2G", "512M", "1.5G" or "4096KiB" into
// bytes, rounding a fraction of a byte up.
func Parse(s string) (int64, error) {
	m := sizeRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return 0, fmt.Errorf("invalid size %q: want a number and a unit, e.g. \"512M\" or \"2G\" (1024-based)", s)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q: %w", s, err)
	}
	shift := strings.IndexByte("bkmgtp", strings.ToLower(m[2])[0]) * 10
	b := math.Ceil(v * float64(int64(1)<<shift))
	if b < 1 || b > Max {
		return 0, fmt.Errorf("invalid size %q: out of range", s)
	}
	return int64(b), nil
}

// Format renders n bytes for people: "512 B", "4.0 MiB", "1.5 GiB".
func Format(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
