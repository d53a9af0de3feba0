package bytesize

import (
	"math"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in   string
		want int64
	}{
		{"2G", 2 << 30}, {"512M", 512 << 20}, {"512m", 512 << 20}, {"1.5G", 3 << 29},
		{"4096K", 4 << 20}, {"2GiB", 2 << 30}, {"64MB", 64 << 20}, {"1T", 1 << 40}, {"1gib", 1 << 30},
		{" 8 M ", 8 << 20}, {"4096b", 4096}, {"0.5k", 512}, {"1.0001K", 1025}, {"4P", 4 << 50},
	}
	for _, tt := range tests {
		got, err := Parse(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("Parse(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "G", "2", "1024", "-1G", "0M", "2X", "1e3M", "2 G B", "1,5G", "99999999P", "2 GiBs", "NaNG"} {
		if got, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) = %d, want error", bad, got)
		}
	}
}

func TestFormat(t *testing.T) {
	for in, want := range map[int64]string{0: "0 B", 512: "512 B", 1023: "1023 B", 1024: "1.0 KiB", 4 << 20: "4.0 MiB",
		3 << 29: "1.5 GiB", 1 << 40: "1.0 TiB", 1 << 50: "1.0 PiB", math.MaxInt64: "8.0 EiB"} {
		if got := Format(in); got != want {
			t.Errorf("Format(%d) = %q, want %q", in, got, want)
		}
	}
}

// Every size Format prints parses back to within its rounding.
func TestFormatParses(t *testing.T) {
	for _, n := range []int64{1 << 10, 3 << 29, 5<<40 + 1} {
		s := Format(n)
		s = s[:len(s)-3] + s[len(s)-3:len(s)-2] // "1.5 GiB" → "1.5 G"
		got, err := Parse(s)
		if err != nil || math.Abs(float64(got-n)) > float64(n)/20 {
			t.Errorf("Parse(Format(%d)) = %d, %v", n, got, err)
		}
	}
}
