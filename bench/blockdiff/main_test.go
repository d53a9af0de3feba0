package main

import (
	"bytes"
	"testing"
)

func TestCompare(t *testing.T) {
	const bs = 4
	old := []byte("\x00\x00\x00\x00abcdabcd\x00\x00\x00\x00xy")
	tests := []struct {
		name string
		cur  []byte
		want Counts
	}{
		{"same", old, Counts{Blocks: 5, NonZeroOld: 3, NonZeroNew: 3, Changed: 0}},
		{"one block changed", []byte("\x00\x00\x00\x00abcdabXd\x00\x00\x00\x00xy"), Counts{5, 3, 3, 1}},
		{"zeroed and written", []byte("\x00\x00\x01\x00abcd\x00\x00\x00\x00\x00\x00\x00\x00xz"), Counts{5, 3, 3, 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Compare(bytes.NewReader(old), bytes.NewReader(tt.cur), bs)
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestCompareLengthMismatch(t *testing.T) {
	if _, err := Compare(bytes.NewReader(make([]byte, 10)), bytes.NewReader(make([]byte, 12)), 4); err == nil {
		t.Fatal("images of different lengths compared without error")
	}
}

// TestCompareLarge spans several internal reads.
func TestCompareLarge(t *testing.T) {
	const bs = 512
	old := make([]byte, bs*1000+7)
	cur := bytes.Clone(old)
	cur[bs*700] = 1
	cur[len(cur)-1] = 1
	got, err := Compare(bytes.NewReader(old), bytes.NewReader(cur), bs)
	if err != nil {
		t.Fatal(err)
	}
	want := Counts{Blocks: 1001, NonZeroOld: 0, NonZeroNew: 2, Changed: 2}
	if got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}
}
