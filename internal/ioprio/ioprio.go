// Package ioprio sets the I/O scheduling priority of the whole process, so
// that reading a running VM's disks yields to the guest's own I/O.
//
// Rules the code keeps:
//   - Linux keeps the I/O priority per thread, and a new thread inherits
//     its creator's: Set changes every thread that exists now (listed in
//     /proc/self/task), so threads the Go runtime starts later inherit it.
//   - The priority only matters to I/O schedulers that honour it (BFQ;
//     not mq-deadline or none) and to reads that reach the device (not the
//     page cache). Where it cannot be set, Set says why and the backup goes
//     on at the normal priority.
package ioprio

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Class is an I/O scheduling class.
type Class int

// The classes of ioprio_set(2).
const (
	None       Class = 0 // leave the priority as it is
	BestEffort Class = 2 // the normal class (at its lowest level, 7)
	Idle       Class = 3 // I/O only when no one else needs the device
)

// Parse reads a class as written in flags and configuration files:
// "idle", "best-effort" or "none".
func Parse(s string) (Class, error) {
	switch s {
	case "idle":
		return Idle, nil
	case "best-effort":
		return BestEffort, nil
	case "none", "":
		return None, nil
	}
	return None, fmt.Errorf("unknown I/O priority %q: want idle, best-effort or none", s)
}

// String returns the class's name as Parse reads it.
func (c Class) String() string {
	switch c {
	case Idle:
		return "idle"
	case BestEffort:
		return "best-effort"
	}
	return "none"
}

const (
	whoProcess = 1 // IOPRIO_WHO_PROCESS: one thread, by its id
	classShift = 13
)

// Set gives every thread of the process class c (None does nothing).
func Set(c Class) error {
	if c == None {
		return nil
	}
	prio := int(c) << classShift
	if c == BestEffort {
		prio |= 7
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return fmt.Errorf("set I/O priority %s: %w", c, err)
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if _, _, errno := unix.Syscall(unix.SYS_IOPRIO_SET, whoProcess, uintptr(tid), uintptr(prio)); errno != 0 && errno != unix.ESRCH {
			return fmt.Errorf("set I/O priority %s: %w", c, errno)
		}
	}
	return nil
}

// Get returns the class of thread tid (0: the calling thread).
func Get(tid int) (Class, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOPRIO_GET, whoProcess, uintptr(tid), 0)
	if errno != 0 {
		return None, fmt.Errorf("get I/O priority: %w", errno)
	}
	return Class(int(r) >> classShift), nil
}
