package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Run status values of vmvault_backup_last_status.
const (
	metricOK      = 0
	metricWarning = 1
	metricFailed  = 2
)

// vmMetrics is one VM's values in the metrics file.
type vmMetrics struct {
	lastSuccess, lastRun, status, duration float64
	bytesRead, bytesNew, bytesStored       float64
	snapshotPeak, guestHeld                float64
	snapshotWindow                         float64
}

// metricDefs lists the gauges of the metrics file, in file order.
var metricDefs = []struct {
	name, help string
	field      func(*vmMetrics) *float64
}{
	{"vmvault_backup_last_success_timestamp_seconds", "Unix time of the VM's last successful backup (ok or with warnings); 0 if none.", func(m *vmMetrics) *float64 { return &m.lastSuccess }},
	{"vmvault_backup_last_run_timestamp_seconds", "Unix time the VM's last backup run ended.", func(m *vmMetrics) *float64 { return &m.lastRun }},
	{"vmvault_backup_last_status", "Status of the VM's last backup run: 0 ok, 1 warnings, 2 failed.", func(m *vmMetrics) *float64 { return &m.status }},
	{"vmvault_backup_duration_seconds", "Duration of the VM's last backup run.", func(m *vmMetrics) *float64 { return &m.duration }},
	{"vmvault_backup_read_bytes", "Bytes read from the VM's disks by the last successful backup.", func(m *vmMetrics) *float64 { return &m.bytesRead }},
	{"vmvault_backup_new_bytes", "Bytes of new (not deduplicated) data in the last successful backup.", func(m *vmMetrics) *float64 { return &m.bytesNew }},
	{"vmvault_backup_stored_bytes", "Bytes stored (compressed, encrypted) by the last successful backup.", func(m *vmMetrics) *float64 { return &m.bytesStored }},
	{"vmvault_backup_snapshot_peak_ratio", "Peak fill of the VM's LVM snapshots during the last successful backup (0 to 1).", func(m *vmMetrics) *float64 { return &m.snapshotPeak }},
	{"vmvault_backup_snapshot_window_seconds", "How long the VM's snapshots existed (the guest paid copy-on-write) in the last successful backup.", func(m *vmMetrics) *float64 { return &m.snapshotWindow }},
	{"vmvault_backup_guest_held_seconds", "How long the guest was held (flushed/frozen, databases locked) in the last successful backup.", func(m *vmMetrics) *float64 { return &m.guestHeld }},
}

// recordMetrics merges one VM's outcome into the Prometheus textfile at
// path: other VMs' values, and this VM's last success after a failure,
// are kept. The file is replaced atomically (temp file + rename) under
// an flock on path+".lock", so concurrent runs of different VMs do not
// lose each other's update.
func recordMetrics(path string, o vmOutcome, end time.Time) error {
	lf, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("metrics file: %w", err)
	}
	defer lf.Close()
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("metrics file: lock: %w", err)
	}
	all := map[string]*vmMetrics{}
	if b, err := os.ReadFile(path); err == nil {
		all = parseMetrics(b)
	} else if !os.IsNotExist(err) {
		return fmt.Errorf("metrics file: %w", err)
	}
	m := all[o.VM]
	if m == nil {
		m = &vmMetrics{}
		all[o.VM] = m
	}
	m.lastRun = float64(end.Unix())
	m.duration = o.Duration
	switch o.Status {
	case "failed":
		m.status = metricFailed
	default:
		m.status = metricOK
		if o.Status == "warning" {
			m.status = metricWarning
		}
		m.lastSuccess = float64(end.Unix())
		m.bytesRead, m.bytesNew, m.bytesStored = float64(o.BytesRead), float64(o.BytesNew), float64(o.BytesStored)
		m.snapshotPeak, m.guestHeld, m.snapshotWindow = o.SnapshotPeak/100, o.GuestHeld, o.SnapshotWindow
	}
	return writeFileAtomic(path, formatMetrics(all), 0o644)
}

// Label values escape backslash, double quote and newline, as the text
// exposition format specifies.
var (
	labelEscaper   = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
	labelUnescaper = strings.NewReplacer(`\\`, `\`, `\"`, `"`, `\n`, "\n")
)

// formatMetrics writes the text exposition format, VMs sorted.
func formatMetrics(all map[string]*vmMetrics) []byte {
	vms := make([]string, 0, len(all))
	for vm := range all {
		vms = append(vms, vm)
	}
	slices.Sort(vms)
	var b bytes.Buffer
	for _, d := range metricDefs {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s gauge\n", d.name, d.help, d.name)
		for _, vm := range vms {
			fmt.Fprintf(&b, "%s{vm=\"%s\"} %s\n", d.name, labelEscaper.Replace(vm), strconv.FormatFloat(*d.field(all[vm]), 'g', -1, 64))
		}
	}
	return b.Bytes()
}

// parseMetrics reads back a file formatFile wrote; lines it does not know
// are dropped (the file is vmvault's own).
func parseMetrics(b []byte) map[string]*vmMetrics {
	fields := map[string]func(*vmMetrics) *float64{}
	for _, d := range metricDefs {
		fields[d.name] = d.field
	}
	all := map[string]*vmMetrics{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		name, rest, ok := strings.Cut(line, `{vm=`)
		field := fields[name]
		if !ok || field == nil {
			continue
		}
		i := strings.LastIndex(rest, "} ")
		if i < 0 {
			continue
		}
		quoted := rest[:i]
		v, err := strconv.ParseFloat(rest[i+2:], 64)
		if err != nil || len(quoted) < 2 || quoted[0] != '"' || quoted[len(quoted)-1] != '"' {
			continue
		}
		vm := labelUnescaper.Replace(quoted[1 : len(quoted)-1])
		if all[vm] == nil {
			all[vm] = &vmMetrics{}
		}
		*field(all[vm]) = v
	}
	return all
}

// writeFileAtomic replaces path with data: readers see the old or the
// new file, never a partial one.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("metrics file: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("metrics file: %w", err)
	}
	return nil
}
