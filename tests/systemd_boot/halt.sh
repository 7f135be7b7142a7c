#!/bin/bash
# Powers off a container booted by boot.sh and removes its cgroup. Exits non-zero if anything of
# the container is left behind.
#   halt.sh DIR
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: halt.sh SCRATCH_DIR}
wrapper=$(cat "$dir/wrapper.pid" 2>/dev/null || true)
init=$(cat "$dir/init.pid" 2>/dev/null || true)
if [ -z "$init" ] && [ -s "$dir/unshare.pid" ]; then
    # boot.sh gave up before systemd was up: PID 1 is still the only child of `unshare --fork`.
    u=$(cat "$dir/unshare.pid")
    init=$(cat "/proc/$u/task/$u/children" 2>/dev/null || true)
    init=${init%% *}
fi

alive() { [ -n "$wrapper" ] && kill -0 "$wrapper" 2>/dev/null; }
wait_gone() { for _ in $(seq "$1"); do alive || return 0; sleep 0.1; done; ! alive; }

if alive; then
    clean=no
    if [ -s "$dir/init.pid" ]; then
        timeout 10 "$here/inside.sh" "$dir" systemctl poweroff --no-block >/dev/null 2>&1
        wait_gone 300 && clean=yes
    fi
    if [ "$clean" = no ]; then
        # Killing the PID 1 of a pid namespace kills every process in it, and only those.
        echo "halt.sh: no clean poweroff; killing the container's PID 1 ($init)" >&2
        [ -n "$init" ] && kill -KILL "$init" 2>/dev/null
        wait_gone 100 || { echo "halt.sh: the container is still running (pty helper $wrapper)" >&2; exit 1; }
    fi
fi

cgroup=$(cat "$dir/cgroup" 2>/dev/null || true)
if [ -n "$cgroup" ]; then
    # Children first (the container's systemd made init.scope, system.slice, ...). rmdir fails on a
    # cgroup that still holds a process, which is exactly what must not go unnoticed.
    unshare --mount --propagation private sh -c '
        mount -t cgroup2 cgroup2 "$1" || exit 1
        [ -d "$1/$2" ] && find "$1/$2" -depth -type d -exec rmdir {} +
        left=$([ -d "$1/$2" ] && echo yes)
        umount "$1"
        [ -z "$left" ]' sh "$dir/cg" "$cgroup" ||
        { echo "halt.sh: cgroup $cgroup could not be removed" >&2; exit 1; }
fi
# The owner watcher (boot.sh), unless it is the one running this.
watcher=$(cat "$dir/watcher.pid" 2>/dev/null || true)
if [ -n "$watcher" ] && [ "$watcher" != "$PPID" ] && [ "$watcher" != "$$" ]; then
    kill "$watcher" 2>/dev/null
fi
exit 0
