#!/bin/sh
# Runs the real-LVM tests: the harness self-test (internal/lvmguest) and the
# snapshot package's in-guest tests (snapshot.TestLVMInGuest), printing the
# guest console and timings. Needs qemu-system-x86 linux-image-amd64
# busybox-static lvm2 e2fsprogs xfsprogs. The first run builds the cached
# kernel and initramfs (a few seconds); later runs reuse them.
set -eu
cd "$(dirname "$0")/../.."
exec go test -count=1 -v -timeout 15m -run 'TestRunBootsGuest|TestLVMInGuest' ./internal/lvmguest/ ./snapshot/ "$@"
