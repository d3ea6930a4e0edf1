"""Run a command under the system-call sandbox of deploy/systemd/mandrill.service, without
systemd: ``python3 sandbox.py ALLOWED_SYSCALLS_FILE -- ARGV…``.

Run by the system's python3 (Debian's python3-seccomp binds libseccomp for it), it installs
what ``SystemCallFilter=`` (an allow-list, EPERM for the rest, native architecture only) and
``MemoryDenyWriteExecute=yes`` (the kernel's PR_SET_MDWE, which systemd 256 and later use)
install, then execs ARGV, which inherits both, as do its children (the restart commands).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def main() -> None:
    import seccomp  # type: ignore[import-not-found]

    allowed_file, separator, *argv = sys.argv[1:]
    if separator != "--" or not argv:
        sys.exit(__doc__)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(f"sandbox: PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
    with open(allowed_file) as file:
        syscalls = file.read().split()
    rules = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in syscalls:
        try:
            rules.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):  # a name libseccomp does not know on this arch
            continue
    rules.load()
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
