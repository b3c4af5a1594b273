#!/usr/bin/env bash
# Makes a Debian base image from Debian's own packages, for hosts that cannot pull one from a
# registry: `debootstrap --variant=minbase` into a temporary folder, then `podman import` (or
# `docker import`). About a minute and 120 MB; skipped when the image is there already.
#
#   deploy/base-image.sh [IMAGE]        default localhost/debian-base:bookworm
#
# Environment: CONTAINER_ENGINE (podman, else docker), DEBIAN_SUITE (bookworm), DEBIAN_MIRROR
# (http://deb.debian.org/debian), FORCE=1 to make it again. Needs root (debootstrap creates
# device nodes and root-owned files); it uses sudo when run as another user.
set -euo pipefail

suite=${DEBIAN_SUITE:-bookworm}
image=${1:-localhost/debian-base:$suite}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
engine=${CONTAINER_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
sudo=$([ "$(id -u)" = 0 ] || echo sudo)

if [ -z "${FORCE:-}" ] && $engine image inspect "$image" >/dev/null 2>&1; then
    echo "$image is there (FORCE=1 makes it again)"
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "base-image.sh: debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 2
}

root=$(mktemp -d "${TMPDIR:-/var/tmp}/vaewatch-rootfs.XXXXXX")
trap '$sudo rm -rf "$root"' EXIT
$sudo debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    echo "base-image.sh: debootstrap failed; the whole log is $root.log" >&2
    exit 1
}
rm -f "$root.log"

# The suite's updates and security fixes too, as Debian's official images have them.
$sudo tee "$root/etc/apt/sources.list" >/dev/null <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
EOF
# Downloaded packages and package lists are not part of an image.
$sudo rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
$sudo tar -C "$root" --numeric-owner -c . | $engine import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$image" >/dev/null
echo "$image: Debian $suite (minbase) from $mirror"
