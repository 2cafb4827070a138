"""Run a command inside a named network namespace: ``python _nsexec.py NAME CMD [ARG...]``.

What ``ip netns exec NAME CMD`` does for the benchmark, where iproute2 is not installed: join
``/var/run/netns/NAME`` with ``setns(2)``, then ``exec`` the command (same pid, so ending it
ends the command). Standard library only, so that it runs before anything is imported.
"""

import ctypes
import ctypes.util
import os
import sys

CLONE_NEWNET = 0x40000000


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    name, argv = sys.argv[1], sys.argv[2:]
    fd = os.open(os.path.join("/var/run/netns", name), os.O_RDONLY)
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    os.close(fd)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
