package ioprio

import (
	"os"
	"strconv"
	"testing"
)

// Set reaches every thread of the process, as the kernel reports it.
func TestSetIdleAllThreads(t *testing.T) {
	if err := Set(Idle); err != nil {
		t.Skipf("this kernel refuses ioprio_set: %v", err)
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		tid, _ := strconv.Atoi(task.Name())
		c, err := Get(tid)
		if err != nil {
			continue // the thread ended
		}
		if c != Idle {
			t.Fatalf("thread %d has I/O class %v after Set(Idle)", tid, c)
		}
	}
	for _, s := range []string{"idle", "best-effort", "none"} {
		if c, err := Parse(s); err != nil || c.String() != s {
			t.Fatalf("Parse(%q) = %v, %v", s, c, err)
		}
	}
	if _, err := Parse("low"); err == nil {
		t.Fatal("unknown class accepted")
	}
}
