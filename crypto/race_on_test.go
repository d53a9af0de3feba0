//go:build race

package crypto

// raceEnabled: the race detector's shadow memory takes page faults of its
// own for every page the heap touches, so fault counts mean nothing.
const raceEnabled = true
