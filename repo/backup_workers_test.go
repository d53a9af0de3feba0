package repo

import (
	"runtime"
	"testing"
)

// The segment workers stay one per core when the command raises
// GOMAXPROCS (cmd/vmvault's backup runs with twice the processors): with
// a worker per processor, a backup spent more CPU time for nothing.
func TestWorkersFollowStartProcs(t *testing.T) {
	want := min(startProcs, maxWorkers)
	old := runtime.GOMAXPROCS(2 * startProcs)
	defer runtime.GOMAXPROCS(old)
	if got := workers(); got != want {
		t.Fatalf("workers() = %d with GOMAXPROCS %d, want %d (started with %d processors)", got, runtime.GOMAXPROCS(0), want, startProcs)
	}
}
