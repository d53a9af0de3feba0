package snapshot

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

const mib = 1 << 20

func readDelta(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "thin_delta", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestParseThinDeltaReal parses outputs captured in the guest: the writes
// made there (see testdata/thin_delta/README.md) come back exactly, in 64
// KiB blocks.
func TestParseThinDeltaReal(t *testing.T) {
	got, err := ParseThinDelta(readDelta(t, "mixed.xml"), 2, 3, 256*mib)
	if err != nil {
		t.Fatal(err)
	}
	want := []Range{
		{Off: 2 * mib, Len: 3 * mib},   // 3 MiB rewritten at 2 MiB (different)
		{Off: 6 * mib, Len: 1 * mib},   // 1 MiB discarded at 6 MiB (left_only)
		{Off: 20 * mib, Len: 1 * mib},  // 1 MiB written at 20 MiB (right_only)
		{Off: 625 * 65536, Len: 65536}, // 4 KiB at 40960000: its 64 KiB block
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ranges = %v, want %v", got, want)
	}
	got, err = ParseThinDelta(readDelta(t, "unchanged.xml"), 1, 3, 256*mib)
	if err != nil || len(got) != 0 {
		t.Errorf("unchanged: ranges %v, err %v; want none", got, err)
	}
	if _, err := ParseThinDelta(readDelta(t, "mixed.xml"), 2, 4, 256*mib); err == nil {
		t.Error("a diff of other devices than asked for was accepted")
	}
}

func delta(entries string) string {
	return `<superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="3">` + entries + `
  </diff>
</superblock>
`
}

func TestParseThinDelta(t *testing.T) {
	const blk = 65536
	tests := []struct {
		name string
		out  string
		size int64
		want []Range
		err  string
	}{
		{name: "adjacent entries merge", size: 1 * mib,
			out:  delta(`<different begin="0" length="2"/><right_only begin="2" length="1"/><left_only begin="3" length="1"/>`),
			want: []Range{{0, 4 * blk}}},
		{name: "same between splits", size: 1 * mib,
			out:  delta(`<different begin="0" length="1"/><same begin="1" length="1"/><different begin="2" length="1"/>`),
			want: []Range{{0, blk}, {2 * blk, blk}}},
		{name: "last block cut at size", size: 3*blk + 4096,
			out:  delta(`<right_only begin="3" length="1"/>`),
			want: []Range{{3 * blk, 4096}}},
		{name: "empty diff", size: mib, out: delta(""), want: nil},
		{name: "bigger blocks", size: 64 * mib,
			out:  strings.Replace(delta(`<different begin="1" length="1"/>`), `"128"`, `"2048"`, 1),
			want: []Range{{mib, mib}}},
		{name: "unknown element", size: mib, out: delta(`<moved begin="0" length="1"/>`), err: "unknown element"},
		{name: "unknown attribute", size: mib, out: delta(`<different begin="0" length="1" to="3"/>`), err: "unknown attribute"},
		{name: "unknown superblock attribute", size: mib,
			out: strings.Replace(delta(""), "uuid=", `colour="red" uuid=`, 1), err: "unknown attribute"},
		{name: "negative", size: mib, out: delta(`<different begin="-1" length="1"/>`), err: "not a number"},
		{name: "hex", size: mib, out: delta(`<different begin="0x1" length="1"/>`), err: "not a number"},
		{name: "plus sign", size: mib, out: delta(`<different begin="+1" length="1"/>`), err: "not a number"},
		{name: "overflow", size: mib, out: delta(`<different begin="99999999999999999999" length="1"/>`), err: "not a number"},
		{name: "missing length", size: mib, out: delta(`<different begin="1"/>`), err: "lacks"},
		{name: "zero length", size: mib, out: delta(`<different begin="1" length="0"/>`), err: "out of order"},
		{name: "out of order", size: mib, out: delta(`<different begin="4" length="1"/><different begin="2" length="1"/>`), err: "out of order"},
		{name: "overlap", size: mib, out: delta(`<same begin="0" length="4"/><different begin="3" length="1"/>`), err: "out of order"},
		{name: "past the end", size: mib, out: delta(`<different begin="15" length="2"/>`), err: "past"},
		{name: "huge length", size: mib, out: delta(`<different begin="1" length="9223372036854775807"/>`), err: "past"},
		{name: "text", size: mib, out: delta(`hello`), err: "unexpected text"},
		{name: "not empty", size: mib, out: delta(`<different begin="0" length="1"><x/></different>`), err: "not empty"},
		{name: "truncated", size: mib, out: delta(`<different begin="0" length="1"/>`)[:120], err: "EOF"},
		{name: "no diff", size: mib, out: `<superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="0"></superblock>`, err: "no <superblock> with a <diff>"},
		{name: "two diffs", size: mib, out: strings.Replace(delta(""), "</superblock>", `<diff left="2" right="3"></diff></superblock>`, 1), err: "unexpected <diff>"},
		{name: "two superblocks", size: mib, out: delta("") + delta(""), err: "want one <superblock>"},
		{name: "empty", size: mib, out: "", err: "no <superblock>"},
		{name: "usage text", size: mib, out: "Usage: thin_delta [options]", err: "unexpected text"},
		{name: "block size too small", size: mib, out: strings.Replace(delta(""), `"128"`, `"8"`, 1), err: "out of range"},
		{name: "block size zero", size: mib, out: strings.Replace(delta(""), `"128"`, `"0"`, 1), err: "out of range"},
		{name: "mismatched close", size: mib, out: strings.Replace(delta(""), "</diff>", "</dif>", 1), err: "element"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseThinDelta([]byte(tt.out), 2, 3, tt.size)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("got %v, %v; want an error containing %q", got, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ranges = %v, want %v", got, tt.want)
			}
		})
	}
}

// FuzzParseThinDelta: whatever thin_delta prints, the ranges are sorted,
// do not touch or overlap, lie inside the volume and are whole blocks but
// for one cut at the end.
func FuzzParseThinDelta(f *testing.F) {
	f.Add(readDelta(f, "mixed.xml"), int64(256*mib))
	f.Add(readDelta(f, "unchanged.xml"), int64(256*mib))
	f.Add([]byte(delta(`<different begin="0" length="2"/><right_only begin="3" length="1"/>`)), int64(mib))
	f.Fuzz(func(t *testing.T, out []byte, size int64) {
		if size <= 0 || size > 1<<50 {
			return
		}
		rs, err := ParseThinDelta(out, 2, 3, size)
		if err != nil {
			return
		}
		var end int64 = -1
		for _, r := range rs {
			if r.Len <= 0 || r.Off <= end || r.Off+r.Len > size {
				t.Fatalf("bad range %v after end %d (size %d) in %v", r, end, size, rs)
			}
			end = r.Off + r.Len
		}
	})
}

func TestThinBaseNote(t *testing.T) {
	b := ThinBase{LV: LV{VG: "vg0", Name: "vm01-hda-vmvault-base"}, Pool: LV{VG: "vg0", Name: "pool"}, ThinID: 7, UUID: "AzNCbj-oqo1"}
	note := b.Note()
	got, err := ParseThinBase(note)
	if err != nil {
		t.Fatal(err)
	}
	if got.LV != b.LV || got.Pool != b.Pool || got.ThinID != 7 || got.UUID != "AzNCbj-oqo1" {
		t.Errorf("ParseThinBase(%s) = %+v", note, got)
	}
	for _, bad := range []string{
		"", "{}", "none", note + "x",
		`{"kind":"thin","lv":"vg0/a","pool":"vg0/p","thin_id":1,"uuid":"u","extra":1}`,
		`{"kind":"qemu","lv":"vg0/a","pool":"vg0/p","thin_id":1,"uuid":"u"}`,
		`{"kind":"thin","lv":"vg0/a","pool":"vg1/p","thin_id":1,"uuid":"u"}`,
		`{"kind":"thin","lv":"vg0/-a","pool":"vg0/p","thin_id":1,"uuid":"u"}`,
		`{"kind":"thin","lv":"vg0/a","pool":"vg0/p","thin_id":0,"uuid":"u"}`,
		`{"kind":"thin","lv":"vg0/a","pool":"vg0/p","thin_id":1,"uuid":""}`,
	} {
		if b, err := ParseThinBase(bad); err == nil {
			t.Errorf("ParseThinBase(%q) = %+v, want error", bad, b)
		}
	}
}

func TestParseVolume(t *testing.T) {
	// Captured in the guest (lvs with lvsVolumeFields, --units b).
	v, err := parseVolume("  vm01-hda-vmvault|vg|thin|pool|2|AzNCbj-oqo1|vm01|vmvault,vmvault-vm=vm01|Vwi-a-tz-k|268435456\n")
	if err != nil {
		t.Fatal(err)
	}
	want := Volume{LV: LV{VG: "vg", Name: "vm01-hda-vmvault"}, SegType: "thin", Pool: "pool", ThinID: 2, UUID: "AzNCbj-oqo1",
		Origin: "vm01", Tags: []string{"vmvault", "vmvault-vm=vm01"}, Attr: "Vwi-a-tz-k", Size: 256 * mib}
	if !reflect.DeepEqual(v, want) {
		t.Errorf("parseVolume = %+v\nwant %+v", v, want)
	}
	if !v.Thin() || !v.OwnedBy("vm01") || v.OwnedBy("vm0") || v.PoolLV() != (LV{VG: "vg", Name: "pool"}) {
		t.Errorf("Thin %v OwnedBy(vm01) %v OwnedBy(vm0) %v PoolLV %v", v.Thin(), v.OwnedBy("vm01"), v.OwnedBy("vm0"), v.PoolLV())
	}
	plain, err := parseVolume("  plain|vg|linear|||f6APco|||-wi-a-----|16777216")
	if err != nil || plain.Thin() || plain.OwnedBy("vm01") {
		t.Errorf("linear volume: %+v, %v", plain, err)
	}
	for _, bad := range []string{"", "a|b", "x|vg|thin|pool|-1|u||||1", "x|vg|thin|pool|1|u|||Vwi-a-tz--|big",
		"x|vg|thin|pool|1|u|||Vwi-a-tz--|1\ny|vg|thin|pool|1|u|||Vwi-a-tz--|1"} {
		if v, err := parseVolume(bad); err == nil {
			t.Errorf("parseVolume(%q) = %+v, want error", bad, v)
		}
	}
}

func TestParseBases(t *testing.T) {
	out := strings.Join([]string{
		"  vm01-hda-vmvault-base|vmvault,vmvault-vm=vm01",
		"  vm01-hdb-vmvault-base|vmvault,vmvault-vm=vm01",
		"  vm01-x-vmvault-base|vmvault-vm=vm01",               // no vmvault tag: not ours
		"  vm01-db-y-vmvault-base|vmvault,vmvault-vm=vm01-db", // VM vm01-db's
		"  vm01-hda-vmvault|vmvault,vmvault-vm=vm01",          // a snapshot, not a base
		"  vm01-vmvault-base|vmvault,vmvault-vm=vm01",         // no disk name
		"  vm01|",
	}, "\n")
	got := parseBases(out, "vg0", "vm01")
	want := map[string]LV{"hda": {VG: "vg0", Name: "vm01-hda-vmvault-base"}, "hdb": {VG: "vg0", Name: "vm01-hdb-vmvault-base"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parseBases = %v, want %v", got, want)
	}
	if left := parseLeftovers("vm01-hda-vmvault-base|vm01|vmvault,vmvault-vm=vm01\n", "vg0", "vm01"); len(left) != 0 {
		t.Errorf("a base was taken for a leftover: %v", left)
	}
}

// scriptRunner answers commands from a table and records them.
type scriptRunner struct {
	calls   []string
	answers map[string]func() ([]byte, error)
}

func (s *scriptRunner) Run(_ context.Context, name string, args ...string) ([]byte, error) {
	line := strings.Join(append([]string{name}, args...), " ")
	s.calls = append(s.calls, line)
	for prefix, f := range s.answers {
		if strings.HasPrefix(line, prefix) {
			return f()
		}
	}
	return nil, nil
}

// TestThinDeltaReleases: the metadata snapshot is released whether
// thin_delta succeeds, fails or prints something unexpected, and the
// device names double the dashes in names.
func TestThinDeltaReleases(t *testing.T) {
	pool := LV{VG: "vg-a", Name: "thin-pool"}
	for _, tc := range []struct {
		name  string
		out   []byte
		err   error
		fails bool
	}{
		{name: "ok", out: readDelta(t, "mixed.xml")},
		{name: "thin_delta fails", err: &CommandError{Args: []string{"thin_delta"}, Err: fmt.Errorf("exit status 1"), Stderr: "Unable to find mapping tree"}, fails: true},
		{name: "garbage", out: []byte("<superblock>"), fails: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &scriptRunner{answers: map[string]func() ([]byte, error){
				"thin_delta": func() ([]byte, error) { return tc.out, tc.err },
			}}
			rs, err := ThinDelta(context.Background(), r, pool, 2, 3, 256*mib)
			if tc.fails != (err != nil) {
				t.Fatalf("ranges %v, err %v; want failure %v", rs, err, tc.fails)
			}
			want := []string{
				"dmsetup message vg--a-thin--pool-tpool 0 reserve_metadata_snap",
				"thin_delta -m --snap1 2 --snap2 3 /dev/mapper/vg--a-thin--pool_tmeta",
				"dmsetup message vg--a-thin--pool-tpool 0 release_metadata_snap",
			}
			if !slices.Equal(r.calls, want) {
				t.Errorf("commands:\n%s\nwant:\n%s", strings.Join(r.calls, "\n"), strings.Join(want, "\n"))
			}
		})
	}
	// Reserving fails for another reason: nothing to release, no delta.
	r := &scriptRunner{answers: map[string]func() ([]byte, error){
		"dmsetup message vg--a-thin--pool-tpool 0 reserve": func() ([]byte, error) {
			return nil, &CommandError{Err: fmt.Errorf("exit status 1"), Stderr: "No such device"}
		},
	}}
	if _, err := ThinDelta(context.Background(), r, pool, 2, 3, mib); err == nil || len(r.calls) != 1 {
		t.Errorf("reserve failing: err %v, commands %v", err, r.calls)
	}
}

// A metadata snapshot another process holds: vmvault waits for it, and
// when it stays reserved says how to release it.
func TestReserveMetadataBusy(t *testing.T) {
	busy := func() ([]byte, error) {
		return nil, &CommandError{Err: fmt.Errorf("exit status 1"), Stderr: "device-mapper: message ioctl on vg-pool-tpool  failed: Device or resource busy"}
	}
	pool := LV{VG: "vg", Name: "pool"}
	n := 0
	r := &scriptRunner{answers: map[string]func() ([]byte, error){
		"dmsetup message vg-pool-tpool 0 reserve": func() ([]byte, error) {
			if n++; n < 3 {
				return busy()
			}
			return nil, nil
		},
	}}
	if err := reserveMetadata(context.Background(), r, pool, "vg-pool", time.Minute); err != nil || n != 3 {
		t.Fatalf("after two busy answers: %v (%d tries)", err, n)
	}
	r = &scriptRunner{answers: map[string]func() ([]byte, error){"dmsetup": busy}}
	err := reserveMetadata(context.Background(), r, pool, "vg-pool", 0)
	if err == nil || !strings.Contains(err.Error(), "dmsetup message vg-pool-tpool 0 release_metadata_snap") {
		t.Fatalf("a reservation that stays: %v", err)
	}
}
