package main

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A chunk damaged on the server: check --read-data names it, repair
// quarantines it and lists the generation that stays damaged (exit 3),
// the next backup stores the content again and both generations restore
// byte-identical.
func TestRepairDamagedChunkCLI(t *testing.T) {
	e := newEnv(t)
	src := filepath.Join(e.dir, "disk.raw")
	img := writeImage(t, src, 21, 6<<20)
	e.ok("backup", "vm01", "--source", src)
	// Damage the largest chunk (header byte 2 is the type: 1 = chunk).
	var victim string
	var size int64
	filepath.WalkDir(filepath.Join(e.repo, "data"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		b, _ := os.ReadFile(p)
		if len(b) > 4 && b[2] == 1 && int64(len(b)) > size {
			victim, size = p, int64(len(b))
		}
		return nil
	})
	b, _ := os.ReadFile(victim)
	b[len(b)/2] ^= 1
	os.Chmod(victim, 0o644)
	os.WriteFile(victim, b, 0o444)
	name := strings.TrimPrefix(victim, e.repo+"/")
	e.fails(exitError, name, "check", "--read-data")

	r := e.run(nil, "repair", "--read-data", "--json")
	if r.code != exitPartial {
		t.Fatalf("repair: exit %d: %s", r.code, r.stderr)
	}
	var rep struct {
		Quarantined []struct{ Object, To string }
		Damaged     []string `json:"damaged_generations"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || len(rep.Quarantined) != 1 || rep.Quarantined[0].Object != name || len(rep.Damaged) != 1 {
		t.Fatalf("repair report: %v %s", err, r.stdout)
	}
	if q, err := os.ReadFile(filepath.Join(e.repo, rep.Quarantined[0].To)); err != nil || string(q) != string(b) {
		t.Fatalf("quarantined copy: %v", err)
	}
	e.ok("backup", "vm01", "--source", src)
	var gens []struct {
		ID string `json:"id"`
	}
	json.Unmarshal([]byte(e.ok("snapshots", "--json").stdout), &gens)
	if len(gens) != 2 {
		t.Fatalf("generations: %+v", gens)
	}
	for _, g := range gens {
		if out := e.ok("restore", "vm01", g.ID[:8]).stdout; sum([]byte(out)) != sum(img) {
			t.Fatalf("generation %s restores wrong", g.ID[:8])
		}
	}
	e.ok("check", "--read-data")
	r = e.ok("repair", "--dry-run")
	if !strings.Contains(r.stderr, "0 object(s) quarantined") {
		t.Fatalf("repair of a sound repository: %s", r.stderr)
	}
}
