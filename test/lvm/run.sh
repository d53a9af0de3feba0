#!/bin/sh
# Runs the real-LVM tests: the harness self-test (internal/lvmguest), the
# snapshot package's in-guest tests (snapshot.TestLVMInGuest) and the
# end-to-end `vmvault backup` tests (test/lvm TestBackupEndToEnd and
# TestThinEndToEnd), printing
# the guest console and timings. Needs qemu-system-x86 linux-image-amd64
# busybox-static lvm2 e2fsprogs xfsprogs thin-provisioning-tools. The first run builds the cached
# kernel and initramfs (a few seconds); later runs reuse them.
# Extra arguments go to go test, e.g. ./run.sh -run TestBackupEndToEnd.
set -eu
cd "$(dirname "$0")/../.."
exec go test -count=1 -v -timeout 40m -run 'TestRunBootsGuest|TestLVMInGuest|TestBackupEndToEnd|TestThinEndToEnd' ./internal/lvmguest/ ./snapshot/ ./test/lvm/ "$@"
