#!/bin/bash
# Runs a command inside a container booted by boot.sh: all its namespaces, its root, a clean
# environment. stdin, stdout, stderr and the exit code are the command's.
#   inside.sh DIR CMD [ARG...]
#   inside.sh DIR systemctl status tokend
#   inside.sh DIR sh -c 'cat > /usr/local/bin/tool && chmod 0755 /usr/local/bin/tool' < tool
set -euo pipefail
dir=${1:?usage: inside.sh SCRATCH_DIR CMD [ARG...]}
shift
exec nsenter --target "$(cat "$dir/init.pid")" --all -- \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    TERM=dumb SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 "$@"
