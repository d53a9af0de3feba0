package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"vmvault/repo"
)

// diskProgress draws one progress bar per disk (bytes, rate, ETA) while a
// backup reads its disks. It is only used on a terminal: cron mail and
// logs stay free of carriage returns.
type diskProgress struct {
	w     io.Writer
	vm    string
	sizes map[string]int64

	mu   sync.Mutex
	disk string
	bar  *progressbar.ProgressBar
}

// progress returns a repo.BackupRequest.Progress callback and a function to
// call when the backup is over, or nil and a no-op when stderr is not a
// terminal (or -q is given).
func (a *app) progress(vm string, disks []repo.DiskSource) (func(string, int64), func()) {
	f, ok := a.stderr.(*os.File)
	if !ok || a.quiet || !term.IsTerminal(int(f.Fd())) {
		return nil, func() {}
	}
	p := &diskProgress{w: f, vm: vm, sizes: map[string]int64{}}
	for _, d := range disks {
		p.sizes[d.Name] = d.Size
	}
	return p.update, p.done
}

// update is called from the backup's reader with the bytes of disk read
// so far; disks are read one after the other.
func (p *diskProgress) update(disk string, read int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if disk != p.disk {
		p.finish()
		p.disk = disk
		p.bar = p.newBar(disk)
	}
	p.bar.Set64(read)
}

func (p *diskProgress) newBar(disk string) *progressbar.ProgressBar {
	size := p.sizes[disk]
	if size <= 0 {
		size = -1 // unknown (stdin): a spinner with bytes and rate
	}
	return progressbar.NewOptions64(size,
		progressbar.OptionSetWriter(p.w),
		progressbar.OptionSetDescription(fmt.Sprintf("%s/%s", p.vm, disk)),
		progressbar.OptionShowBytes(true),
		progressbar.OptionUseIECUnits(true),
		progressbar.OptionShowCount(),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(200*time.Millisecond),
		progressbar.OptionShowElapsedTimeOnFinish(),
		progressbar.OptionUseANSICodes(true),
	)
}

// finish ends the current bar, leaving its last state on its own line.
func (p *diskProgress) finish() {
	if p.bar == nil {
		return
	}
	if !p.bar.IsFinished() {
		p.bar.Exit()
	}
	fmt.Fprintln(p.w)
	p.bar = nil
}

func (p *diskProgress) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.finish()
}
