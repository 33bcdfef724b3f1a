#!/bin/bash
# Builds the .deb (scripts/build-deb.sh), installs it on this machine (as root), and checks what
# a new user relies on: the helper in /sbin, a mount through an fstab line of type
# fuse.mirrorfs (`mount -T FSTAB MOUNTPOINT`), the mount in /proc/mounts, `umount` ending the
# daemon with the mirror equal to the backing directory, the units (systemd-analyze verify),
# man pages and completions in place. Removes the package at the end (unless KEEP=1).
# Run by scripts/test.sh (so by CI) after the release build; about 35 s once cargo-deb is installed
# (its first install compiles it: about a minute on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "deb-test.sh: run it as root (it installs the package)"; exit 1; }
scripts/build-deb.sh
deb=$(ls -1t target/debian/mirrorfs_*.deb | head -1)
echo "== installing $deb"
dpkg -i "$deb"
work=$(mktemp -d /var/tmp/mirrorfs-deb.XXXXXX)
cleanup() {
	umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
	rm -rf "$work"
	[ "${KEEP:-0}" = 1 ] || dpkg -P mirrorfs >/dev/null || true
}
trap cleanup EXIT
fail() { echo "deb-test.sh: FAIL: $*"; exit 1; }
[ -L /sbin/mount.fuse.mirrorfs ] || fail "no /sbin/mount.fuse.mirrorfs"
[ -x /usr/bin/mirrorfs ] || fail "no /usr/bin/mirrorfs"
for f in /usr/share/man/man1/mirrorfs.1.gz /usr/share/man/man1/mirrorfs-mount.1.gz \
	/usr/share/bash-completion/completions/mirrorfs /lib/systemd/system/mirrorfs@.service \
	/lib/systemd/system/mirrorfs-serve@.service; do
	[ -f "$f" ] || fail "$f is missing"
done
if command -v systemd-analyze >/dev/null; then
	echo "== systemd-analyze verify"
	u=$work/units; mkdir -p "$u"
	cp /lib/systemd/system/mirrorfs@.service "$u/mirrorfs@data.service"
	cp /lib/systemd/system/mirrorfs-serve@.service "$u/mirrorfs-serve@srv-mirror.service"
	# Documentation=man:... is checked when man(1) is installed.
	man_opt=--man=no; command -v man >/dev/null && man_opt=--man=yes
	systemd-analyze verify $man_opt "$u/mirrorfs@data.service" "$u/mirrorfs-serve@srv-mirror.service"
fi
echo "== mount through an fstab line"
mkdir -p "$work/backing" "$work/mnt" "$work/mirror"
echo "$work/backing $work/mnt fuse.mirrorfs mirror=$work/mirror,ack=sync,nofail,_netdev,x-systemd.automount,noauto 0 0" >"$work/fstab"
mount -T "$work/fstab" "$work/mnt"
grep -q "^$work/backing $work/mnt fuse.mirrorfs " /proc/mounts || fail "not in /proc/mounts as fuse.mirrorfs: $(grep "$work/mnt" /proc/mounts)"
echo hello >"$work/mnt/a.txt"
mkdir "$work/mnt/d"; echo there >"$work/mnt/d/b.txt"
umount "$work/mnt"
for _ in $(seq 300); do pgrep -f "mirrorfs mount $work/backing" >/dev/null || break; sleep 0.1; done
pgrep -f "mirrorfs mount $work/backing" >/dev/null && fail "the daemon is still running after umount"
diff -r --exclude=.mirrorfs "$work/backing" "$work/mirror" || fail "the mirror differs from the backing directory"
echo "deb-test: 1 passed, 0 failed"
