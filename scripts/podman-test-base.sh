#!/usr/bin/env bash
# A local base image for test/packaging/images.test.ts where no container registry is reachable: Debian 12
# (minbase) with python3, from Debian's packages (debootstrap), imported into podman as
# localhost/aeterna-test/bookworm-python3. Needs root, debootstrap and podman (apt-get install debootstrap podman,
# and runc where crun refuses the host's cgroups). Takes a few minutes; the image is about 260 MB.
set -euo pipefail
image=localhost/aeterna-test/bookworm-python3:latest
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3 bookworm "$rootfs" "$mirror"
tar -C "$rootfs" -c . | podman import --quiet - "$image"
echo "$image"
