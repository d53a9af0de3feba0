package retention

import (
	"strings"
	"testing"
	"time"
)

func TestParseDuration(t *testing.T) {
	tests := []struct {
		in      string
		want    time.Duration
		wantErr bool
	}{
		{in: "30d", want: 30 * Day},
		{in: "1y2m3d4h", want: Year + 2*Month + 3*Day + 4*time.Hour},
		{in: "2m", want: 2 * Month}, // months, as in restic
		{in: "2w", want: 14 * Day},
		{in: "1y", want: 365 * Day},
		{in: "12h", want: 12 * time.Hour},
		{in: "0d", want: 0},
		{in: "1h30m", want: 90 * time.Minute}, // out of restic order: a Go duration
		{in: "90s", want: 90 * time.Second},
		{in: "36h", want: 36 * time.Hour},
		{in: "1.5h", want: 90 * time.Minute},
		{in: "", wantErr: true},
		{in: "d", wantErr: true},
		{in: "7", wantErr: true},
		{in: "7x", wantErr: true},
		{in: "1d1d", wantErr: true},
		{in: "-3d", wantErr: true},
		{in: "-3h", wantErr: true},
		{in: "99999999999y", wantErr: true},
		{in: "1 d", wantErr: true},
	}
	for _, tt := range tests {
		got, err := ParseDuration(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseDuration(%q) error %v, want error %v", tt.in, err, tt.wantErr)
			continue
		}
		if err == nil && got != tt.want {
			t.Errorf("ParseDuration(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestFormatDurationRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{7 * Day, "7d"}, {36 * time.Hour, "1d12h"}, {5 * time.Hour, "5h"},
		{90 * time.Minute, "1h30m0s"}, {Year, "365d"}, {0, "0s"},
	} {
		s := FormatDuration(tc.d)
		if s != tc.want {
			t.Errorf("FormatDuration(%v) = %q, want %q", tc.d, s, tc.want)
		}
		back, err := ParseDuration(s)
		if err != nil || back != tc.d {
			t.Errorf("ParseDuration(FormatDuration(%v)) = %v, %v", tc.d, back, err)
		}
	}
}

func TestPolicyEmptyValidateString(t *testing.T) {
	if !(Policy{}).Empty() || !(Policy{AllowEmpty: true}).Empty() {
		t.Error("zero policy (with or without AllowEmpty) is not Empty")
	}
	for _, p := range []Policy{{Last: 1}, {Hourly: -1}, {Daily: 1}, {Weekly: 1}, {Monthly: 1}, {Yearly: 1}, {Within: time.Hour}, {Tags: []string{"a"}}} {
		if p.Empty() {
			t.Errorf("%+v is Empty", p)
		}
		if err := p.Validate(); err != nil {
			t.Errorf("%+v: Validate: %v", p, err)
		}
	}
	err := Policy{Daily: -2, Within: -time.Hour, Tags: []string{""}}.Validate()
	if err == nil {
		t.Fatal("Validate accepted keep-daily -2, negative within and an empty tag")
	}
	for _, want := range []string{"keep-daily -2", "keep-within", "empty tag"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Validate error %q does not mention %q", err, want)
		}
	}
	p := Policy{Daily: 7, Weekly: 4, Within: 30 * Day, Tags: []string{"keep"}}
	if got, want := p.String(), `keep-daily 7, keep-weekly 4, keep-within 30d, keep-tag "keep"`; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got := (Policy{}).String(); got != "no policy" {
		t.Errorf("empty String() = %q", got)
	}
}
