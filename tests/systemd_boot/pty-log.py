"""Runs a command on a new pseudo-terminal and appends everything it prints there to a log.

    python3 pty-log.py LOG CMD [ARG...]

boot.sh uses it to give the container a /dev/console. Exits with the command's status once the
command has exited and the terminal has been read to the end.
"""

import os
import pty
import sys


def main() -> int:
    log, argv = sys.argv[1], sys.argv[2:]
    pid, master = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    with open(log, "ab", buffering=0) as out:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side is gone
                break
            if not chunk:
                break
            out.write(chunk)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
