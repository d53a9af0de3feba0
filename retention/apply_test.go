package retention

import (
	"slices"
	"testing"
	"time"
	_ "time/tzdata" // Europe/Berlin must load even where /usr/share/zoneinfo is missing
)

type genSpec struct {
	id    string
	at    string // RFC 3339; the offset written is the Berlin offset, for the reader
	tags  []string
	group string // default "vm01"
}

func mustLoc(t testing.TB, name string) *time.Location {
	t.Helper()
	loc, err := time.LoadLocation(name)
	if err != nil {
		t.Fatalf("load time zone %s: %v", name, err)
	}
	return loc
}

func mustTime(t testing.TB, s string) time.Time {
	t.Helper()
	tm, err := time.Parse(time.RFC3339, s)
	if err != nil {
		t.Fatalf("parse %q: %v", s, err)
	}
	return tm
}

func TestApply(t *testing.T) {
	berlin := mustLoc(t, "Europe/Berlin")
	tests := []struct {
		name   string
		gens   []genSpec
		policy Policy
		now    string         // default 2030-01-01
		loc    *time.Location // default Europe/Berlin
		want   map[string][]string
	}{
		{
			name:   "several generations per day keep the newest of each day",
			policy: Policy{Daily: 3},
			gens: []genSpec{
				{id: "a", at: "2024-01-10T20:00:00+01:00"},
				{id: "b", at: "2024-01-10T08:00:00+01:00"},
				{id: "c", at: "2024-01-10T01:00:00+01:00"},
				{id: "d", at: "2024-01-09T23:59:00+01:00"},
				{id: "e", at: "2024-01-09T00:00:00+01:00"},
				{id: "f", at: "2024-01-07T12:00:00+01:00"}, // 8th has none: not counted
				{id: "g", at: "2024-01-06T12:00:00+01:00"},
			},
			want: map[string][]string{"a": {"daily 1"}, "d": {"daily 2"}, "f": {"daily 3"}},
		},
		{
			name:   "days are local days",
			policy: Policy{Daily: 2},
			gens: []genSpec{
				{id: "a", at: "2024-01-10T23:30:00Z"}, // 11th 00:30 in Berlin
				{id: "b", at: "2024-01-10T22:30:00Z"}, // 10th 23:30
				{id: "c", at: "2024-01-10T12:00:00Z"}, // 10th 13:00
			},
			want: map[string][]string{"a": {"daily 1"}, "b": {"daily 2"}},
		},
		{
			name:   "days in UTC when loc is UTC",
			policy: Policy{Daily: 2},
			loc:    time.UTC,
			gens: []genSpec{
				{id: "a", at: "2024-01-10T23:30:00Z"},
				{id: "b", at: "2024-01-10T22:30:00Z"},
				{id: "c", at: "2024-01-09T12:00:00Z"},
			},
			want: map[string][]string{"a": {"daily 1"}, "c": {"daily 2"}},
		},
		{
			name:   "month ends",
			policy: Policy{Monthly: 4},
			gens: []genSpec{
				{id: "a", at: "2024-04-30T23:59:00+02:00"},
				{id: "b", at: "2024-04-01T00:00:00+02:00"},
				{id: "c", at: "2024-03-31T23:59:00+02:00"},
				{id: "d", at: "2024-03-01T00:01:00+01:00"},
				{id: "e", at: "2024-02-29T23:59:00+01:00"},
				{id: "f", at: "2024-01-31T23:30:00Z"}, // 1 February 00:30 in Berlin
				{id: "g", at: "2024-01-31T22:30:00Z"}, // 31 January 23:30 in Berlin
			},
			want: map[string][]string{"a": {"monthly 1"}, "c": {"monthly 2"}, "e": {"monthly 3"}, "g": {"monthly 4"}},
		},
		{
			name:   "leap years",
			policy: Policy{Daily: Unlimited, Yearly: 3},
			gens: []genSpec{
				{id: "a", at: "2024-03-01T10:00:00+01:00"},
				{id: "b", at: "2024-02-29T10:00:00+01:00"},
				{id: "c", at: "2024-02-28T10:00:00+01:00"},
				{id: "d", at: "2023-03-01T10:00:00+01:00"},
				{id: "e", at: "2023-02-28T10:00:00+01:00"},
				{id: "f", at: "2020-02-29T10:00:00+01:00"},
			},
			want: map[string][]string{
				"a": {"daily 1", "yearly 1"}, "b": {"daily 2"}, "c": {"daily 3"},
				"d": {"daily 4", "yearly 2"}, "e": {"daily 5"}, "f": {"daily 6", "yearly 3"},
			},
		},
		{
			name:   "keep-within a year is 365 days, also across Feb 29",
			policy: Policy{Within: Year},
			gens: []genSpec{
				{id: "a", at: "2024-03-01T10:00:00+01:00"},
				{id: "b", at: "2023-03-02T10:00:01+01:00"},
				{id: "c", at: "2023-03-01T10:00:00+01:00"},
			},
			want: map[string][]string{"a": {"within 365d"}, "b": {"within 365d"}},
		},
		{
			name:   "DST spring forward (Berlin 31 March 2024, 02:00 -> 03:00)",
			policy: Policy{Hourly: 3, Daily: 2},
			gens: []genSpec{
				{id: "a", at: "2024-03-31T03:30:00+02:00"},
				{id: "b", at: "2024-03-31T03:10:00+02:00"},
				{id: "c", at: "2024-03-31T01:50:00+01:00"}, // 20 minutes of real time before b
				{id: "d", at: "2024-03-31T01:20:00+01:00"},
				{id: "e", at: "2024-03-30T23:40:00+01:00"},
			},
			want: map[string][]string{"a": {"hourly 1", "daily 1"}, "c": {"hourly 2"}, "e": {"hourly 3", "daily 2"}},
		},
		{
			name:   "DST fall back (Berlin 27 October 2024, 03:00 -> 02:00): the repeated hour is two hours",
			policy: Policy{Hourly: 4, Daily: 2},
			gens: []genSpec{
				{id: "a", at: "2024-10-27T02:40:00+01:00"}, // second 02:xx (CET)
				{id: "b", at: "2024-10-27T02:10:00+01:00"},
				{id: "c", at: "2024-10-27T02:50:00+02:00"}, // first 02:xx (CEST)
				{id: "d", at: "2024-10-27T02:05:00+02:00"},
				{id: "e", at: "2024-10-27T01:59:00+02:00"},
				{id: "f", at: "2024-10-26T23:59:00+02:00"},
			},
			want: map[string][]string{"a": {"hourly 1", "daily 1"}, "c": {"hourly 2"}, "e": {"hourly 3"}, "f": {"hourly 4", "daily 2"}},
		},
		{
			name:   "the 25-hour day of DST fall back is one day",
			policy: Policy{Daily: 2},
			gens: []genSpec{
				{id: "a", at: "2024-10-27T23:59:00+01:00"},
				{id: "b", at: "2024-10-27T00:00:00+02:00"}, // 25 hours earlier, same day
				{id: "c", at: "2024-10-26T23:59:00+02:00"},
			},
			want: map[string][]string{"a": {"daily 1"}, "c": {"daily 2"}},
		},
		{
			name:   "ISO weeks across the year boundary",
			policy: Policy{Weekly: 4},
			gens: []genSpec{
				{id: "a", at: "2025-01-06T12:00:00+01:00"}, // Mon, 2025-W02
				{id: "b", at: "2025-01-05T12:00:00+01:00"}, // Sun, 2025-W01
				{id: "c", at: "2025-01-01T12:00:00+01:00"}, // Wed, 2025-W01
				{id: "d", at: "2024-12-30T12:00:00+01:00"}, // Mon, 2025-W01
				{id: "e", at: "2024-12-29T12:00:00+01:00"}, // Sun, 2024-W52
				{id: "f", at: "2024-12-23T12:00:00+01:00"}, // Mon, 2024-W52
				{id: "g", at: "2024-12-22T12:00:00+01:00"}, // Sun, 2024-W51
			},
			want: map[string][]string{"a": {"weekly 1"}, "b": {"weekly 2"}, "e": {"weekly 3"}, "g": {"weekly 4"}},
		},
		{
			name:   "ISO week 53",
			policy: Policy{Weekly: 2},
			gens: []genSpec{
				{id: "a", at: "2021-01-03T12:00:00+01:00"}, // Sun, 2020-W53
				{id: "b", at: "2020-12-28T12:00:00+01:00"}, // Mon, 2020-W53
				{id: "c", at: "2020-12-27T12:00:00+01:00"}, // Sun, 2020-W52
			},
			want: map[string][]string{"a": {"weekly 1"}, "c": {"weekly 2"}},
		},
		{
			name:   "keep-within counts from the newest generation, not from now",
			policy: Policy{Within: 7 * Day},
			now:    "2025-01-01T00:00:00Z",
			gens: []genSpec{
				{id: "a", at: "2024-05-10T12:00:00Z"},
				{id: "b", at: "2024-05-09T12:00:00Z"},
				{id: "c", at: "2024-05-03T12:01:00Z"},
				{id: "d", at: "2024-05-03T12:00:00Z"}, // exactly 7 days: not newer
				{id: "e", at: "2024-05-01T00:00:00Z"},
			},
			want: map[string][]string{"a": {"within 7d"}, "b": {"within 7d"}, "c": {"within 7d"}},
		},
		{
			name:   "tags, and the newest is protected",
			policy: Policy{Tags: []string{"monthly", "keep"}},
			gens: []genSpec{
				{id: "a", at: "2024-05-10T12:00:00Z", tags: []string{"nightly"}},
				{id: "b", at: "2024-05-09T12:00:00Z", tags: []string{"monthly"}},
				{id: "c", at: "2024-05-08T12:00:00Z", tags: []string{"keep", "monthly"}},
				{id: "d", at: "2024-05-07T12:00:00Z"},
			},
			want: map[string][]string{"a": {ReasonNewest}, "b": {"tag monthly"}, "c": {"tag monthly", "tag keep"}},
		},
		{
			name:   "allow-empty lets the newest go",
			policy: Policy{Tags: []string{"x"}, AllowEmpty: true},
			gens: []genSpec{
				{id: "a", at: "2024-05-10T12:00:00Z"},
				{id: "b", at: "2024-05-09T12:00:00Z"},
			},
			want: map[string][]string{},
		},
		{
			name:   "last",
			policy: Policy{Last: 2},
			gens: []genSpec{
				{id: "a", at: "2024-05-10T12:00:00Z"},
				{id: "b", at: "2024-05-10T11:00:00Z"},
				{id: "c", at: "2024-05-10T10:00:00Z"},
			},
			want: map[string][]string{"a": {"last 1"}, "b": {"last 2"}},
		},
		{
			name:   "equal times are ordered by ID",
			policy: Policy{Last: 1, Daily: 1},
			gens: []genSpec{
				{id: "b", at: "2024-05-10T12:00:00Z"},
				{id: "a", at: "2024-05-10T12:00:00Z"},
			},
			want: map[string][]string{"a": {"last 1", "daily 1"}},
		},
		{
			name:   "a combination keeps each generation once with all reasons",
			policy: Policy{Last: 1, Daily: 2, Weekly: 2, Within: 12 * time.Hour, Tags: []string{"x"}},
			gens: []genSpec{
				{id: "a", at: "2024-05-15T20:00:00+02:00"}, // Wed, W20
				{id: "b", at: "2024-05-15T08:01:00+02:00"},
				{id: "c", at: "2024-05-14T20:00:00+02:00"},                      // Tue, W20
				{id: "d", at: "2024-05-12T20:00:00+02:00"},                      // Sun, W19
				{id: "e", at: "2024-05-06T20:00:00+02:00", tags: []string{"x"}}, // Mon, W19
				{id: "f", at: "2024-05-05T20:00:00+02:00"},                      // Sun, W18
			},
			want: map[string][]string{
				"a": {"last 1", "daily 1", "weekly 1", "within 12h"},
				"b": {"within 12h"},
				"c": {"daily 2"},
				"d": {"weekly 2"},
				"e": {"tag x"},
			},
		},
		{
			name:   "unlimited",
			policy: Policy{Daily: Unlimited, Hourly: 1},
			gens: []genSpec{
				{id: "a", at: "2024-05-10T12:00:00Z"},
				{id: "b", at: "2024-05-10T11:00:00Z"},
				{id: "c", at: "2023-05-10T11:00:00Z"},
				{id: "d", at: "2020-05-10T11:00:00Z"},
			},
			want: map[string][]string{"a": {"hourly 1", "daily 1"}, "c": {"daily 2"}, "d": {"daily 3"}},
		},
		{
			name:   "future generations are kept but take no slot and are never the newest",
			policy: Policy{Last: 1, Daily: 2, Within: 36 * time.Hour},
			now:    "2024-06-01T12:00:00Z",
			gens: []genSpec{
				{id: "f1", at: "2024-06-01T18:00:00Z"}, // later today
				{id: "f2", at: "2025-01-01T00:00:00Z"},
				{id: "a", at: "2024-06-01T06:00:00Z"},
				{id: "b", at: "2024-05-31T06:00:00Z"},
				{id: "c", at: "2024-05-30T06:00:00Z"},
			},
			want: map[string][]string{
				"f1": {ReasonFuture}, "f2": {ReasonFuture},
				"a": {"last 1", "daily 1", "within 1d12h"}, "b": {"daily 2", "within 1d12h"},
			},
		},
		{
			name:   "a future generation does not take the newest-protection",
			policy: Policy{Tags: []string{"x"}},
			now:    "2024-06-01T12:00:00Z",
			gens: []genSpec{
				{id: "f", at: "2030-06-01T18:00:00Z", tags: []string{"x"}},
				{id: "a", at: "2024-06-01T06:00:00Z"},
				{id: "b", at: "2024-05-31T06:00:00Z"},
			},
			want: map[string][]string{"f": {"tag x", ReasonFuture}, "a": {ReasonNewest}},
		},
		{
			name:   "groups are independent",
			policy: Policy{Last: 1, Within: 2 * Day},
			gens: []genSpec{
				{id: "a", at: "2024-05-10T12:00:00Z"},
				{id: "b", at: "2024-05-01T12:00:00Z"},
				{id: "c", at: "2024-01-01T12:00:00Z", group: "vm02"},
				{id: "d", at: "2023-12-31T12:00:00Z", group: "vm02"},
				{id: "e", at: "2023-12-01T12:00:00Z", group: "vm02"},
			},
			want: map[string][]string{"a": {"last 1", "within 2d"}, "c": {"last 1", "within 2d"}, "d": {"within 2d"}},
		},
		{
			name:   "an empty policy keeps everything",
			policy: Policy{},
			gens: []genSpec{
				{id: "a", at: "2024-05-10T12:00:00Z"},
				{id: "b", at: "2024-05-01T12:00:00Z"},
			},
			want: map[string][]string{"a": {ReasonNoPolicy}, "b": {ReasonNoPolicy}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			now := mustTime(t, "2030-01-01T00:00:00Z")
			if tt.now != "" {
				now = mustTime(t, tt.now)
			}
			loc := berlin
			if tt.loc != nil {
				loc = tt.loc
			}
			var gens []Generation
			for _, s := range tt.gens {
				g := Generation{ID: s.id, Time: mustTime(t, s.at), Tags: s.tags, Group: s.group}
				if g.Group == "" {
					g.Group = "vm01"
				}
				gens = append(gens, g)
			}
			got := Apply(gens, tt.policy, now, loc)
			if len(got) != len(gens) {
				t.Fatalf("got %d decisions for %d generations", len(got), len(gens))
			}
			for _, d := range got {
				want, keep := tt.want[d.ID]
				if d.Keep != keep || !slices.Equal(d.Reasons, want) {
					t.Errorf("%s (%s): keep=%v %q, want keep=%v %q", d.ID, d.Time.In(loc).Format(time.RFC3339), d.Keep, d.Reasons, keep, want)
				}
				if d.Future != d.Time.After(now) {
					t.Errorf("%s: Future=%v, time %s, now %s", d.ID, d.Future, d.Time, now)
				}
			}
		})
	}
}

func TestApplyOrder(t *testing.T) {
	base := mustTime(t, "2024-05-10T12:00:00Z")
	gens := []Generation{
		{ID: "x1", Time: base.Add(-time.Hour), Group: "vm02"},
		{ID: "y1", Time: base, Group: "vm01"},
		{ID: "x2", Time: base, Group: "vm02"},
		{ID: "y2", Time: base.Add(-48 * time.Hour), Group: "vm01"},
		{ID: "y3", Time: base.Add(time.Hour), Group: "vm01"},
	}
	got := Apply(gens, Policy{Last: 1}, base.Add(24*time.Hour), time.UTC)
	var ids []string
	for _, d := range got {
		ids = append(ids, d.ID)
	}
	if want := []string{"y3", "y1", "y2", "x2", "x1"}; !slices.Equal(ids, want) {
		t.Errorf("order %q, want %q (group, then newest first)", ids, want)
	}
	if gens[0].ID != "x1" {
		t.Error("Apply reordered its input")
	}
}

func TestApplyNilLocationIsLocal(t *testing.T) {
	gens := []Generation{{ID: "a", Time: time.Now().Add(-time.Hour)}, {ID: "b", Time: time.Now().Add(-72 * time.Hour)}}
	a := Apply(gens, Policy{Daily: 5}, time.Now(), nil)
	b := Apply(gens, Policy{Daily: 5}, time.Now(), time.Local)
	for i := range a {
		if !slices.Equal(a[i].Reasons, b[i].Reasons) {
			t.Errorf("%s: nil loc %q, time.Local %q", a[i].ID, a[i].Reasons, b[i].Reasons)
		}
	}
}

// A client that can only add generations dates one a minute after each
// genuine one; they all arrive now. Against arrival times the forged
// ones are unverified: kept, in no rule, never the newest, so every
// genuine generation gets the verdict it gets without the attack.
func TestApplyUnverifiedByArrival(t *testing.T) {
	now := mustTime(t, "2030-06-30T12:00:00Z")
	var genuine, all []Generation
	// The newest genuine one is two days old: a forgery within the
	// tolerance (26 h) of its arrival cannot be recognised.
	for d := 401; d >= 2; d-- {
		at := now.AddDate(0, 0, -d)
		g := Generation{ID: at.Format("g-2006-01-02"), Time: at, Arrived: at.Add(10 * time.Minute), Group: "vm01"}
		genuine = append(genuine, g)
		all = append(all, g, Generation{ID: at.Format("x-2006-01-02"), Time: at.Add(time.Minute), Arrived: now, Group: "vm01"})
	}
	all = append(all, Generation{ID: "future", Time: now.AddDate(1, 0, 0), Arrived: now, Group: "vm01"})
	pol := Policy{Daily: 7, Weekly: 5, Monthly: 12}
	want := map[string][]string{}
	for _, d := range Apply(genuine, pol, now, time.UTC) {
		want[d.ID] = d.Reasons
	}
	unverified := 0
	for _, d := range Apply(all, pol, now, time.UTC) {
		switch {
		case d.ID == "future":
			if !d.Keep || !d.Future || !slices.Equal(d.Reasons, []string{ReasonFuture}) {
				t.Errorf("future: %+v", d)
			}
		case d.ID[0] == 'x':
			unverified++
			if !d.Keep || !d.Unverified || !slices.Equal(d.Reasons, []string{ReasonUnverified}) {
				t.Errorf("forged %s: %+v", d.ID, d)
			}
		default:
			if d.Unverified || !slices.Equal(d.Reasons, want[d.ID]) {
				t.Errorf("genuine %s: %v %v, without the attack %v", d.ID, d.Unverified, d.Reasons, want[d.ID])
			}
		}
	}
	if unverified != 400 {
		t.Fatalf("%d forged generations unverified, want 400", unverified)
	}
	// A genuine backup that took 20 hours is verified; an unknown
	// arrival verifies nothing and accuses nothing.
	for _, c := range []struct {
		rec, arr time.Time
		want     bool
	}{
		{now, now.Add(20 * time.Hour), false},
		{now, now.Add(27 * time.Hour), true},
		{now.Add(10 * time.Minute), now, false},
		{now.Add(20 * time.Minute), now, true},
		{now, time.Time{}, false},
	} {
		if got := Unverified(c.rec, c.arr, 0); got != c.want {
			t.Errorf("Unverified(%v, %v) = %v", c.rec, c.arr, got)
		}
	}
}
