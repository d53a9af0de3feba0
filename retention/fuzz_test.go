package retention

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
	"time"
)

// fuzzInput turns fuzz bytes into a policy and generations. The first 8
// bytes are the policy, then 6 bytes per generation: a signed offset in
// minutes from a base time (about ±45 days), a group and a tag bitmask.
func fuzzInput(data []byte) (Policy, []Generation, time.Time) {
	base := time.Date(2024, 10, 27, 1, 30, 0, 0, time.UTC) // near a Berlin DST change
	count := func(b byte) int { return int(b%8) - 1 }      // -1 (unlimited) .. 6
	var p Policy
	if len(data) >= 8 {
		p = Policy{
			Last: count(data[0]), Hourly: count(data[1]), Daily: count(data[2]),
			Weekly: count(data[3]), Monthly: count(data[4]), Yearly: count(data[5]),
			Within:     time.Duration(data[6]%16) * 6 * time.Hour,
			AllowEmpty: data[7]&1 != 0,
		}
		if data[7]&2 != 0 {
			p.Tags = []string{"t0"}
		}
		if data[7]&4 != 0 {
			p.Tags = append(p.Tags, "t1")
		}
		data = data[8:]
	}
	var gens []Generation
	for i := 0; len(data) >= 6 && i < 200; i++ {
		off := int32(binary.LittleEndian.Uint32(data)) % (45 * 24 * 60)
		g := Generation{
			ID:    fmt.Sprintf("g%03d", i),
			Time:  base.Add(time.Duration(off) * time.Minute),
			Group: fmt.Sprintf("vm%d", data[4]%3),
		}
		for b := range 3 {
			if data[5]&(1<<b) != 0 {
				g.Tags = append(g.Tags, fmt.Sprintf("t%d", b))
			}
		}
		gens = append(gens, g)
		data = data[6:]
	}
	return p, gens, base.Add(30 * 24 * time.Hour)
}

func keptSet(ds []Decision) map[string]bool {
	m := make(map[string]bool)
	for _, d := range ds {
		if d.Keep {
			m[d.ID] = true
		}
	}
	return m
}

func FuzzApply(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 1})
	f.Add([]byte{0, 0, 7, 0, 0, 0, 0, 6, 10, 0, 0, 0, 0, 1, 200, 1, 0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff, 1, 4})
	loc, err := time.LoadLocation("Europe/Berlin")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, gens, now := fuzzInput(data)
		got := Apply(gens, p, now, loc)

		// Deterministic and independent of input order.
		shuffled := slices.Clone(gens)
		rand.New(rand.NewPCG(uint64(len(data)), 1)).Shuffle(len(shuffled), func(i, j int) {
			shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
		})
		if again := Apply(shuffled, p, now, loc); !reflect.DeepEqual(got, again) {
			t.Fatalf("Apply depends on input order:\n%v\n%v", got, again)
		}

		// Keep agrees with Reasons; future generations are kept.
		kept := keptSet(got)
		newest := map[string]*Decision{}
		for i := range got {
			d := &got[i]
			if d.Keep != (len(d.Reasons) > 0) {
				t.Fatalf("%s: Keep=%v with reasons %q", d.ID, d.Keep, d.Reasons)
			}
			if d.Future && !d.Keep {
				t.Fatalf("%s: future generation removed", d.ID)
			}
			if !d.Future && newest[d.Group] == nil {
				newest[d.Group] = d
			}
		}
		// The newest non-future generation survives unless AllowEmpty.
		if !p.AllowEmpty {
			for g, d := range newest {
				if !d.Keep {
					t.Fatalf("group %s: newest %s removed without AllowEmpty", g, d.ID)
				}
			}
		}

		// The kept set is a superset of what each rule keeps on its own.
		singles := []Policy{
			{Last: p.Last}, {Hourly: p.Hourly}, {Daily: p.Daily}, {Weekly: p.Weekly},
			{Monthly: p.Monthly}, {Yearly: p.Yearly}, {Within: p.Within}, {Tags: p.Tags},
		}
		for _, sp := range singles {
			if sp.Empty() {
				continue // an empty policy keeps all by design
			}
			sp.AllowEmpty = true
			for id := range keptSet(Apply(gens, sp, now, loc)) {
				if !kept[id] {
					t.Fatalf("%s kept by %v alone but not by %v", id, sp, p)
				}
			}
		}

		// A rule with count N keeps at most N generations per group.
		for _, r := range p.counts() {
			if r.n <= 0 {
				continue
			}
			per := map[string]int{}
			for _, d := range got {
				for _, reason := range d.Reasons {
					var name string
					var k int
					if _, err := fmt.Sscanf(reason, "%s %d", &name, &k); err == nil && name == r.name {
						per[d.Group]++
						if k < 1 || k > r.n {
							t.Fatalf("%s: reason %q outside 1..%d", d.ID, reason, r.n)
						}
					}
				}
			}
			for g, n := range per {
				if n > r.n {
					t.Fatalf("group %s: %d generations kept by keep-%s %d", g, n, r.name, r.n)
				}
			}
		}
	})
}
