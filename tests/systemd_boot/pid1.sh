#!/bin/bash
# Stage 2 of boot.sh, PID 1 of new pid, uts, ipc, net and cgroup namespaces: mounts /proc, /sys
# and the cgroup2 tree into DIR/root, makes it the root, and becomes systemd.
#   pid1.sh DIR
set -euo pipefail
root=$1/root
hostname tokend-sysd
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
# As container managers do: the kernel knobs under /proc stay read-only (when this kernel has them).
for p in sys sysrq-trigger; do
    [ -e "$root/proc/$p" ] || continue
    mount --bind "$root/proc/$p" "$root/proc/$p"
    mount -o remount,bind,ro "$root/proc/$p"
done
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"
cd "$root"
mkdir -p .host-root
pivot_root . .host-root
cd /
umount -l /.host-root
rmdir /.host-root
# systemd makes / shared only when it is not in a container. Without it the mounts systemd sets up
# for a service do not propagate, and LoadCredential= fails ($CREDENTIALS_DIRECTORY: EACCES).
mount --make-rshared /
# A clean environment, `container=` so that systemd knows where it is, and a capability bounding
# set without what a container has no business using.
exec env -i container=tokend-test TERM=linux PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    setpriv --inh-caps=-all \
    --bounding-set=-sys_module,-sys_time,-sys_rawio,-sys_pacct,-syslog,-wake_alarm,-block_suspend,-mac_admin,-mac_override,-audit_control,-audit_read,-perfmon \
    /lib/systemd/systemd
