package repo

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"
)

func planGarbage(t *testing.T, p *PrunePlan) []string {
	t.Helper()
	var names []string
	if err := p.Garbage(func(name string, size int64) error {
		if size <= 0 {
			t.Errorf("%s: size %d", name, size)
		}
		names = append(names, name)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return names
}

func listData(t *testing.T, root string) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	eachFile(root, []string{"data"}, func(p string) {
		rel, _ := filepath.Rel(root, p)
		out[filepath.ToSlash(rel)] = true
	})
	return out
}

// A prune is a plan, then its execution: the plan lists exactly what
// execution removes; unreferenced objects younger than the safety margin
// (by file time) are not in it.
func TestPrunePlanExecute(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	img := testImage(11, 9<<20)
	old := backupBytes(t, tr.Repository, "vm01", img)
	copy(img[1<<20:], testImage(12, 2<<20))
	keep := backupBytes(t, tr.Repository, "vm01", img)

	// Everything was written just now: the default margin keeps it all.
	plan, err := tr.PlanPrune(ctx, PruneOptions{Forget: []string{old.ID}, Margin: DefaultPruneMargin})
	if err != nil {
		t.Fatal(err)
	}
	if plan.Stats.ObjectsRemoved != 0 || plan.Stats.YoungKept == 0 || plan.Stats.Forgotten != 1 || plan.Stats.Generations != 1 ||
		plan.Stats.IndexRemoved != 0 || plan.Stats.IndexYoungKept == 0 || len(planGarbage(t, plan)) != 0 {
		t.Fatalf("plan within the margin: %+v", plan.Stats)
	}
	young := plan.Stats.YoungKept
	plan.Close()

	// Three hours later (by the files' times) the same objects go.
	ageRepository(t, tr.dir, time.Now().Add(-3*time.Hour), "data", "index")
	plan, err = tr.PlanPrune(ctx, PruneOptions{Forget: []string{old.ID}, Margin: DefaultPruneMargin})
	if err != nil {
		t.Fatal(err)
	}
	defer plan.Close()
	garbage := planGarbage(t, plan)
	if plan.Stats.ObjectsRemoved != young || len(garbage) != young || plan.Stats.YoungKept != 0 || plan.Stats.IndexRemoved == 0 {
		t.Fatalf("plan after the margin: %+v, %d garbage, %d were young", plan.Stats, len(garbage), young)
	}
	before := listData(t, tr.dir)
	if _, err := os.Stat(filepath.Join(tr.dir, "manifests", old.ID)); err != nil {
		t.Fatal("planning removed a manifest")
	}
	st, err := plan.Execute(ctx)
	if err != nil {
		t.Fatal(err)
	}
	after := listData(t, tr.dir)
	var gone []string
	for n := range before {
		if !after[n] {
			gone = append(gone, n)
		}
	}
	sort.Strings(gone)
	sort.Strings(garbage)
	if len(gone) != len(garbage) || st.ObjectsRemoved != len(garbage) {
		t.Fatalf("executed removed %d objects, plan listed %d", len(gone), len(garbage))
	}
	for i := range gone {
		if gone[i] != garbage[i] {
			t.Fatalf("removed %s, plan said %s", gone[i], garbage[i])
		}
	}
	if _, err := os.Stat(filepath.Join(tr.dir, "manifests", old.ID)); !os.IsNotExist(err) {
		t.Fatal("the forgotten manifest is still there")
	}
	r := tr.reopen(t)
	rep, err := r.Check(ctx, CheckOptions{ReadData: true})
	if err != nil || !rep.OK() || rep.Unreferenced != 0 {
		t.Fatalf("check after prune: %+v %v", rep, err)
	}
	if got := restoreBytes(t, r, keep); sha256hex(got) != sha256hex(img) {
		t.Fatal("kept generation restores wrong")
	}
}

// An object younger than the margin is kept even when no lock protects
// it: a backup whose lock prune cannot see keeps its uploads.
func TestPruneMarginProtectsUnlockedBackup(t *testing.T) {
	tr := newTestRepo(t)
	ctx := context.Background()
	backupBytes(t, tr.Repository, "vm01", testImage(13, 5<<20))
	ageRepository(t, tr.dir, time.Now().Add(-3*time.Hour), "data", "index", "manifests")
	// Objects of a backup in progress: stored, not yet in a manifest.
	m := backupBytes(t, tr.Repository, "vm02", testImage(14, 5<<20))
	os.Remove(filepath.Join(tr.dir, "manifests", m.ID))
	plan, err := tr.PlanPrune(ctx, PruneOptions{Margin: DefaultPruneMargin})
	if err != nil {
		t.Fatal(err)
	}
	defer plan.Close()
	if plan.Stats.ObjectsRemoved != 0 || plan.Stats.YoungKept == 0 {
		t.Fatalf("plan removes a running backup's objects: %+v", plan.Stats)
	}
	before := listData(t, tr.dir)
	if _, err := plan.Execute(ctx); err != nil {
		t.Fatal(err)
	}
	if after := listData(t, tr.dir); len(after) != len(before) {
		t.Fatalf("prune removed %d of a running backup's objects", len(before)-len(after))
	}
	// The backup now commits its manifest: a sound generation.
	name := manifestName(mustParse(t, m.ID))
	m.ID = ""
	if err := tr.commitManifest(ctx, m, 0); err != nil {
		t.Fatal(err)
	}
	r := tr.reopen(t)
	rep, err := r.Check(ctx, CheckOptions{ReadData: true})
	if err != nil || !rep.OK() || rep.Manifests != 2 {
		t.Fatalf("check after the late commit: %+v %v (%s)", rep, err, name)
	}
}
