// Package retention decides which backup generations a grandfather-father-son
// policy keeps (the logic behind `vmvault forget` and `vmvault prune`).
//
// It is pure logic: it sees generation IDs, times, tags and groups, never the
// repository. The semantics follow restic's `forget`, so users feel at home:
// within each period (hour, day, ISO week, month, year) the newest generation
// is kept, and a rule "keep N" counts N periods that contain a generation,
// walking back from the newest generation, not from the clock.
package retention

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Unlimited as a count keeps one generation in every period, however many.
const Unlimited = -1

// Policy is a retention policy. A zero count disables its rule; Unlimited
// (-1) keeps every period. A generation is kept when any rule keeps it.
type Policy struct {
	Last    int // the Last newest generations
	Hourly  int // the newest generation of each of the last Hourly hours that have one
	Daily   int // ... of each of the last Daily days that have one
	Weekly  int // ... of each of the last Weekly ISO weeks (Monday to Sunday) that have one
	Monthly int // ... of each of the last Monthly calendar months that have one
	Yearly  int // ... of each of the last Yearly calendar years that have one

	// Within keeps every generation newer than the group's newest
	// generation minus Within (not the clock: a host that stopped backing
	// up does not lose its last generations as time passes).
	Within time.Duration

	// Tags keeps every generation that carries at least one of these tags.
	Tags []string

	// ArrivalTolerance is how far before its arrival a generation's
	// recorded time may lie before it is unverified; 0 means
	// DefaultArrivalTolerance.
	ArrivalTolerance time.Duration

	// AllowEmpty permits removing the newest generation of a group. Without
	// it, the newest (non-future) generation is always kept, so a policy
	// typo can never delete the last backup of a VM.
	AllowEmpty bool
}

// Empty reports whether the policy has no keep rule at all. AllowEmpty is an
// option, not a rule, and is ignored. Apply keeps everything under an empty
// policy; callers usually refuse to run `forget` with one.
func (p Policy) Empty() bool {
	return p.Last == 0 && p.Hourly == 0 && p.Daily == 0 && p.Weekly == 0 &&
		p.Monthly == 0 && p.Yearly == 0 && p.Within == 0 && len(p.Tags) == 0
}

// Validate reports counts below Unlimited, a negative Within and empty tags.
func (p Policy) Validate() error {
	var errs []error
	for _, r := range p.counts() {
		if r.n < Unlimited {
			errs = append(errs, fmt.Errorf("keep-%s %d: must be -1 (unlimited), 0 (off) or positive", r.name, r.n))
		}
	}
	if p.Within < 0 {
		errs = append(errs, fmt.Errorf("keep-within %s: must not be negative", p.Within))
	}
	for _, t := range p.Tags {
		if t == "" {
			errs = append(errs, errors.New("keep-tag: empty tag"))
		}
	}
	return errors.Join(errs...)
}

// String describes the policy in the words of the command-line flags, for
// logs and dry-run headers, e.g. "keep-daily 7, keep-weekly 4".
func (p Policy) String() string {
	var parts []string
	for _, r := range p.counts() {
		if r.n != 0 {
			parts = append(parts, fmt.Sprintf("keep-%s %d", r.name, r.n))
		}
	}
	if p.Within != 0 {
		parts = append(parts, "keep-within "+FormatDuration(p.Within))
	}
	for _, t := range p.Tags {
		parts = append(parts, "keep-tag "+strconv.Quote(t))
	}
	if p.AllowEmpty {
		parts = append(parts, "allow-empty")
	}
	if len(parts) == 0 {
		return "no policy"
	}
	return strings.Join(parts, ", ")
}

type namedCount struct {
	name string
	n    int
}

func (p Policy) counts() []namedCount {
	return []namedCount{
		{"last", p.Last}, {"hourly", p.Hourly}, {"daily", p.Daily},
		{"weekly", p.Weekly}, {"monthly", p.Monthly}, {"yearly", p.Yearly},
	}
}

// Calendar units in ParseDuration. A Policy holds a time.Duration, so a month
// and a year are fixed lengths, not calendar steps.
const (
	Day   = 24 * time.Hour
	Week  = 7 * Day
	Month = 30 * Day
	Year  = 365 * Day
)

// ParseDuration parses a --keep-within duration.
//
// Two forms are accepted. The restic form is a sequence of integer amounts
// with the units y (365 days), m (30 days), w (7 days), d (24 hours) and
// h (hours), each at most once and in that order: "1y2m3d4h", "30d", "2m".
// Note that "m" means months here, as in restic. Anything else is parsed
// as a Go duration ("36h", "1h30m", "90s"), where "m" means minutes; the
// fixed order of the restic form makes "1h30m" unambiguous.
func ParseDuration(s string) (time.Duration, error) {
	if d, ok := parseCalendarDuration(s); ok {
		return d, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("invalid duration %q: want e.g. 30d, 1y6m, 2w or a Go duration like 36h", s)
	}
	if d < 0 {
		return 0, fmt.Errorf("invalid duration %q: must not be negative", s)
	}
	return d, nil
}

func parseCalendarDuration(s string) (time.Duration, bool) {
	units := []struct {
		suffix byte
		size   time.Duration
	}{{'y', Year}, {'m', Month}, {'w', Week}, {'d', Day}, {'h', time.Hour}}
	if s == "" {
		return 0, false
	}
	var total time.Duration
	next := 0 // index of the smallest unit still allowed
	for s != "" {
		i := 0
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
		if i == 0 || i == len(s) || i > 9 { // i > 9: keep the product far from overflow
			return 0, false
		}
		n, _ := strconv.Atoi(s[:i])
		u := next
		for u < len(units) && units[u].suffix != s[i] {
			u++
		}
		if u == len(units) {
			return 0, false
		}
		total += time.Duration(n) * units[u].size
		if total < 0 {
			return 0, false
		}
		next = u + 1
		s = s[i+1:]
	}
	return total, true
}

// FormatDuration formats d for humans in the form ParseDuration reads back:
// whole days as "7d", days and hours as "1d12h", anything finer as a Go
// duration. Months and years are shown as days, since they are not exact.
func FormatDuration(d time.Duration) string {
	switch {
	case d > 0 && d%Day == 0:
		return fmt.Sprintf("%dd", d/Day)
	case d > Day && d%time.Hour == 0:
		return fmt.Sprintf("%dd%dh", d/Day, (d%Day)/time.Hour)
	case d > 0 && d%time.Hour == 0:
		return fmt.Sprintf("%dh", d/time.Hour)
	default:
		return d.String()
	}
}
