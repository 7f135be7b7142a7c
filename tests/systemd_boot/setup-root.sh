#!/bin/bash
# Stage 1 of boot.sh, in a new private mount namespace: builds the container's root in DIR/root.
#   setup-root.sh DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$1
root=$dir/root

# The host's / as the lower layer of an overlay whose upper layer is a tmpfs: the container may
# write anywhere (useradd, /usr/local/bin, /etc/systemd/system) and the host sees none of it.
mount -t tmpfs -o size=4g,mode=0755 tokend-sysd-upper "$dir/ovl"
mkdir "$dir/ovl/upper" "$dir/ovl/work"
mount -t overlay tokend-sysd-root -o "lowerdir=/,upperdir=$dir/ovl/upper,workdir=$dir/ovl/work" "$root"

# A cgroup of our own below the root of the cgroup2 tree. It is what the container's systemd will
# see as its root (cgroup namespace), and the only thing on the host that halt.sh must remove.
cgroup=tokend-sysd-$(basename "$dir")-$$
mount -t cgroup2 cgroup2 "$dir/cg"
mkdir "$dir/cg/$cgroup"
echo "$cgroup" >"$dir/cgroup"
echo $$ >"$dir/cg/$cgroup/cgroup.procs"
umount "$dir/cg"

# Its own /tmp, /run and /dev: nothing the host has there leaks in (or out).
mount -t tmpfs -o mode=1777,nosuid,nodev,size=1g tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755,nosuid,nodev,size=256m tmpfs "$root/run"
mount -t tmpfs -o mode=0755,nosuid,size=16m tmpfs "$root/dev"
while read -r name major minor; do
    mknod -m 0666 "$root/dev/$name" c "$major" "$minor"
done <<'NODES'
null 1 3
zero 1 5
full 1 7
random 1 8
urandom 1 9
tty 5 0
NODES
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
# Our terminal (pty.py's) becomes the container's console.
touch "$root/dev/console"
mount --bind "$(tty)" "$root/dev/console"

# Units the host enables would start in the container too: a second PostgreSQL on a copy of the
# host's data, timers, gettys. Mask every service, timer, socket and path unit the host's
# /etc/systemd/system/*.wants/ enables, and the few that are enabled in other ways.
{
    for link in "$root"/etc/systemd/system/*.wants/*; do
        [ -L "$link" ] || continue
        case "$link" in *.service | *.timer | *.socket | *.path) basename "$link" ;; esac
    done
    printf '%s\n' console-getty.service container-getty@.service getty@tty1.service \
        systemd-timesyncd.service systemd-networkd.service systemd-resolved.service
} | sort -u >"$dir/masked"
while read -r unit; do
    ln -sfn /dev/null "$root/etc/systemd/system/$unit"
done <"$dir/masked"

echo $$ >"$dir/unshare.pid"
exec unshare --pid --fork --uts --ipc --net --cgroup -- "$here/pid1.sh" "$dir"
