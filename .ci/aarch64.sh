#!/usr/bin/env bash
# The ring on aarch64, under emulation: an arm64 Debian root (debootstrap) run through
# qemu-user (binfmt_misc), offlog built there with its C core, and the ring's tests run.
# Emulation shows the code works on aarch64; the ordering argument (offlog/_ring_core.h,
# docs/protocol.md 7.9) is what makes it correct on real weakly ordered hardware.
# qemu-user has no futex_waitv, so the tests of sleeping rings skip themselves there.
#
# Needs root and Debian's packages. Usage: .ci/aarch64.sh [DIR] [pytest arguments...]
# DIR (default /var/tmp/offlog-arm64) keeps the root between runs; the tests run on a copy
# of this work tree's tracked files.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-/var/tmp/offlog-arm64}"
shift || true
tests=("${@:-tests/test_speedups.py tests/test_shm.py tests/test_doorbells.py tests/test_event_loop.py tests/test_writers.py tests/test_files.py}")
root="$dir/root"

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64
if [ ! -x "$root/usr/bin/python3" ]; then
    mkdir -p "$dir"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-dev,gcc,libc6-dev,util-linux \
        bookworm "$root" http://deb.debian.org/debian
fi
if [ ! -x "$root/opt/venv/bin/pytest" ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/host-ca.crt"  # the host's trust, for pip
    chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/host-ca.crt sh -c \
        'python3 -m venv /opt/venv && /opt/venv/bin/pip install -q setuptools wheel "pytest>=7" "pytest-timeout>=2" "hypothesis>=6"'
fi

# The root is a mount point (so `unshare -m` works inside), with /proc, /dev, /dev/shm, /sys.
mounted=()
mount_at() { mount "$@" && mounted=("${*: -1}" "${mounted[@]}"); }
cleanup() { for m in "${mounted[@]}"; do umount "$m"; done; }
trap cleanup EXIT
mount_at --bind "$root" "$root"
mount_at -t proc proc "$root/proc"
mount_at --bind /dev "$root/dev"
mount_at -t tmpfs tmpfs "$root/dev/shm"
mount_at --bind /sys "$root/sys"

rm -rf "$root/src" && mkdir "$root/src"
(cd "$repo" && git ls-files -z | xargs -0 tar -c --ignore-failed-read) | tar -x -C "$root/src"
chroot "$root" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root CI=true sh -c "
    cd /src && pip install -q --no-build-isolation --no-deps -e . &&
    python -c 'import offlog, platform; from offlog.shm import unsupported_reason as u; print(platform.machine(), \"speedups:\", offlog.__with_speedups__, \"rings:\", u() or \"offered\")' &&
    python -m pytest -p no:cacheprovider -q -rfEs --timeout 900 ${tests[*]}"
