#!/bin/bash
# Installs the Debian packages that vmvault's tests, demo and benchmarks use,
# if any is missing. Safe to run repeatedly; quiet when all is present.
set -euo pipefail
pkgs=(openssh-server mariadb-server qemu-system-x86 linux-image-amd64 busybox-static lvm2
      restic debootstrap socat cpio e2fsprogs xfsprogs time)
pkgs+=(qemu-utils) # qemu-img, qemu-io, qemu-nbd: the NBD clients of the nbd and serve tests
pkgs+=(thin-provisioning-tools) # thin_delta, thin_check: change tracking on thin LVs in the test guest
pkgs+=(gcc libc6-dev) # cgo, which the race detector needs (scripts/test.sh's race step)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "deps: installing ${missing[*]}" >&2
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO="sudo"
	$SUDO apt-get update -q >/dev/null
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# MinIO and mc (Go programs, not packages): scripts/test.sh builds them in
# the background itself and sets VMVAULT_SKIP_TOOLS.
[ -n "${VMVAULT_SKIP_TOOLS:-}" ] || bash "$(dirname "$0")/tools.sh"
