package retention

import (
	"cmp"
	"fmt"
	"slices"
	"time"
)

// Generation is what the policy needs to know about one backup generation.
type Generation struct {
	ID   string
	Time time.Time // the recorded backup time (chosen by the client)
	// Arrived is when the repository's store received the generation, by
	// its own clock (the manifest's ModTime); zero if unknown.
	Arrived time.Time
	Tags    []string
	Group   string // policies apply per group: a VM and its set of disks
}

// DefaultArrivalTolerance is how long before its arrival a generation's
// recorded time may lie and still count as verified: a backup records
// its start and commits at its end, and backups warn after 24 hours.
const DefaultArrivalTolerance = 26 * time.Hour

// ArrivalSkew is how far a recorded time may lie after the arrival
// (client clock ahead of the store's) and still count as verified.
const ArrivalSkew = 15 * time.Minute

// Unverified reports whether a generation's recorded time disagrees with
// its arrival: after it by more than ArrivalSkew, or before it by more
// than tolerance (0 means DefaultArrivalTolerance). An unknown arrival
// (zero) verifies nothing and is not held against the generation.
func Unverified(recorded, arrived time.Time, tolerance time.Duration) bool {
	if arrived.IsZero() {
		return false
	}
	if tolerance <= 0 {
		tolerance = DefaultArrivalTolerance
	}
	return recorded.After(arrived.Add(ArrivalSkew)) || arrived.Sub(recorded) > tolerance
}

// Decision is the verdict on one generation.
type Decision struct {
	Generation
	Keep bool
	// Future marks a generation dated after now (clock skew or a forged
	// timestamp). Such a generation is kept but takes part in no rule.
	Future bool
	// Unverified marks a generation whose recorded time disagrees with
	// its arrival (see Unverified): an import, or a time a client forged
	// to steer retention. It is kept, takes part in no rule and is never
	// the newest, like a future one.
	Unverified bool
	// Reasons lists every rule that keeps the generation, in a fixed order,
	// e.g. "last 1", "daily 3", "within 7d", "tag nightly",
	// "newest (never removed)", "future". Empty when it is removed.
	Reasons []string
}

// Reasons for generations kept outside the regular rules.
const (
	ReasonNewest     = "newest (never removed)"
	ReasonFuture     = "future"
	ReasonUnverified = "unverified time"
	ReasonNoPolicy   = "no policy"
)

// Apply decides, for every generation, whether policy p keeps it.
//
// Generations are grouped by Group and the policy applies to each group on
// its own. Periods are calendar periods in loc, which should be the host's
// time zone (time.Local): a "day" is a local calendar day, including the
// 23- and 25-hour days of DST changes, and weeks are ISO weeks (Monday to
// Sunday, so the last days of December may belong to week 1 of next year).
// In the hour repeated when DST ends, the two occurrences are distinct hours.
// A nil loc means time.Local.
//
// Protections:
//   - A generation whose time is after now is marked Future and kept, with
//     the reason "future". It is kept because deleting it could destroy the
//     only copy made by a host with a fast clock; it takes no period slot,
//     is not counted by Last, and is never the "newest" for Within or for
//     the newest-protection, so a forged future generation cannot push
//     genuine older ones out of their daily/weekly slots.
//   - A generation whose recorded time disagrees with its arrival in the
//     repository (Unverified, with p.ArrivalTolerance) is kept for the
//     same reasons and in the same way, with the reason "unverified
//     time": a client that can only add generations cannot date them
//     into the slots of genuine ones. A time forged within the tolerance
//     of its arrival cannot be recognised.
//   - Unless p.AllowEmpty is set, the newest non-future generation of a
//     group is kept even when no rule keeps it ("newest (never removed)").
//   - An empty policy keeps everything ("no policy").
//
// The result is sorted by group, then newest first (ties by ID), and does
// not depend on the order of gens. Counts below Unlimited act as 0; use
// Policy.Validate to reject them.
func Apply(gens []Generation, p Policy, now time.Time, loc *time.Location) []Decision {
	if loc == nil {
		loc = time.Local
	}
	ds := make([]Decision, len(gens))
	for i, g := range gens {
		ds[i] = Decision{Generation: g}
	}
	slices.SortStableFunc(ds, func(a, b Decision) int {
		if c := cmp.Compare(a.Group, b.Group); c != 0 {
			return c
		}
		if c := b.Time.Compare(a.Time); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	for start := 0; start < len(ds); {
		end := start + 1
		for end < len(ds) && ds[end].Group == ds[start].Group {
			end++
		}
		applyGroup(ds[start:end], p, now, loc)
		start = end
	}
	return ds
}

// bucketRule keeps the newest generation of each period until count periods
// have been used. period maps a time to a comparable period identifier.
type bucketRule struct {
	name   string
	count  int
	period func(t time.Time, seq int) any
	last   any
	used   int
}

// hourKey includes the UTC offset so that the hour repeated when DST ends
// counts as two hours, as it is.
type hourKey struct {
	date   string
	hour   int
	offset int
}

type weekKey struct{ year, week int }

// applyGroup applies p to one group sorted newest first.
func applyGroup(ds []Decision, p Policy, now time.Time, loc *time.Location) {
	if p.Empty() {
		for i := range ds {
			ds[i].Keep = true
			ds[i].Future = ds[i].Time.After(now)
			ds[i].Unverified = !ds[i].Future && Unverified(ds[i].Time, ds[i].Arrived, p.ArrivalTolerance)
			ds[i].Reasons = []string{ReasonNoPolicy}
		}
		return
	}
	rules := []*bucketRule{
		{name: "last", count: p.Last, period: func(_ time.Time, seq int) any { return seq }},
		{name: "hourly", count: p.Hourly, period: func(t time.Time, _ int) any {
			_, off := t.Zone()
			return hourKey{t.Format(time.DateOnly), t.Hour(), off}
		}},
		{name: "daily", count: p.Daily, period: func(t time.Time, _ int) any { return t.Format(time.DateOnly) }},
		{name: "weekly", count: p.Weekly, period: func(t time.Time, _ int) any {
			y, w := t.ISOWeek()
			return weekKey{y, w}
		}},
		{name: "monthly", count: p.Monthly, period: func(t time.Time, _ int) any { return t.Year()*100 + int(t.Month()) }},
		{name: "yearly", count: p.Yearly, period: func(t time.Time, _ int) any { return t.Year() }},
	}

	newest := -1
	seq := 0
	for i := range ds {
		d := &ds[i]
		if d.Time.After(now) {
			d.Future = true
			continue
		}
		if Unverified(d.Time, d.Arrived, p.ArrivalTolerance) {
			d.Unverified = true
			continue
		}
		if newest < 0 {
			newest = i
		}
		t := d.Time.In(loc)
		for _, r := range rules {
			if r.count != Unlimited && r.used >= r.count {
				continue
			}
			key := r.period(t, seq)
			if r.used > 0 && key == r.last {
				continue
			}
			r.last = key
			r.used++
			d.Reasons = append(d.Reasons, fmt.Sprintf("%s %d", r.name, r.used))
		}
		seq++
	}

	for i := range ds {
		d := &ds[i]
		if !d.Future && !d.Unverified && newest >= 0 && p.Within > 0 && d.Time.After(ds[newest].Time.Add(-p.Within)) {
			d.Reasons = append(d.Reasons, "within "+FormatDuration(p.Within))
		}
		for j, tag := range p.Tags {
			if slices.Contains(d.Tags, tag) && !slices.Contains(p.Tags[:j], tag) {
				d.Reasons = append(d.Reasons, "tag "+tag)
			}
		}
		if d.Future {
			d.Reasons = append(d.Reasons, ReasonFuture)
		}
		if d.Unverified {
			d.Reasons = append(d.Reasons, ReasonUnverified)
		}
		if i == newest && len(d.Reasons) == 0 && !p.AllowEmpty {
			d.Reasons = append(d.Reasons, ReasonNewest)
		}
		d.Keep = len(d.Reasons) > 0
	}
}
