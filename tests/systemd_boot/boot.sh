#!/bin/bash
# Boots the host's systemd as PID 1 of a throwaway container and waits until it is up.
#
#   boot.sh DIR     DIR: an empty scratch directory; everything of this container lives under it
#   SYSD_OWNER_PID=PID boot.sh DIR     ... and halt it when process PID ends
#
# The container sees an overlay of the host's / (writes land in a tmpfs, the host's files never
# change), its own /tmp, /run and /dev, a loopback-only network and fresh pid, uts, ipc and cgroup
# namespaces. Then: `inside.sh DIR CMD...` runs a command in it, `halt.sh DIR` powers it off and
# removes the one thing it leaves on the host, its cgroup. Needs root.
#
# Files in DIR: console.log (the container's /dev/console), boot.out (this script's helpers),
# init.pid (host pid of the container's systemd), wrapper.pid (the pty helper; exits with the
# container), cgroup (name of its cgroup below the cgroup2 root), masked (units masked inside),
# watcher.pid (see SYSD_OWNER_PID below).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$(cd "${1:?usage: boot.sh SCRATCH_DIR}" && pwd)
mkdir -p "$dir/ovl" "$dir/root" "$dir/cg"
: >"$dir/console.log"
python=$(command -v python3 || true)
[ -n "$python" ] || { echo "boot.sh: python3 is needed for the console pty (pty-log.py)" >&2; exit 1; }

# The pty helper is the container's outermost process: it gives it a terminal for /dev/console,
# copies the console to console.log, and exits when the container's PID 1 does.
setsid "$python" "$here/pty-log.py" "$dir/console.log" \
    unshare --mount --propagation private -- "$here/setup-root.sh" "$dir" \
    >"$dir/boot.out" 2>&1 </dev/null &
wrapper=$!
echo "$wrapper" >"$dir/wrapper.pid"

# With SYSD_OWNER_PID set, the container does not outlive that process: if it dies first (a test
# killed by Ctrl-C or a CI timeout, where no clean-up code runs), this watcher runs halt.sh.
if [ -n "${SYSD_OWNER_PID:-}" ]; then
    setsid bash -c 'while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 0.5; done
        if kill -0 "$2" 2>/dev/null; then echo "owner $1 is gone: halting"; exec "$3/halt.sh" "$4"; fi' \
        watcher "$SYSD_OWNER_PID" "$wrapper" "$here" "$dir" >>"$dir/boot.out" 2>&1 </dev/null &
    echo $! >"$dir/watcher.pid"
fi

# setup-root.sh writes the pid of the process that becomes `unshare --pid --fork`; its only child
# is the container's PID 1, which execs systemd.
init=
for _ in $(seq 150); do
    if [ -s "$dir/unshare.pid" ]; then
        u=$(cat "$dir/unshare.pid")
        c=$(cat "/proc/$u/task/$u/children" 2>/dev/null || true)
        c=${c%% *}
        if [ -n "$c" ] && [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ]; then init=$c; break; fi
    fi
    kill -0 "$(cat "$dir/wrapper.pid")" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$init" ]; then
    echo "boot.sh: systemd did not start" >&2
    tail -n 20 "$dir/boot.out" "$dir/console.log" >&2 || true
    exit 1
fi
echo "$init" >"$dir/init.pid"

state=
for _ in $(seq 300); do
    state=$("$here/inside.sh" "$dir" systemctl is-system-running 2>/dev/null || true)
    case "$state" in running | degraded) break ;; esac
    kill -0 "$init" 2>/dev/null || { echo "boot.sh: the container's systemd died" >&2; exit 1; }
    sleep 0.1
done
case "$state" in
    running) ;;
    degraded) "$here/inside.sh" "$dir" systemctl --failed --no-legend >>"$dir/boot.out" 2>&1 || true ;;
    *) echo "boot.sh: systemd is not up after 30 s (state: ${state:-none})" >&2; tail -n 20 "$dir/console.log" >&2; exit 1 ;;
esac
echo "$state"
