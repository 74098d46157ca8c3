"""Host ports for a server's published container ports.

``choose`` is pure: it takes the ports Docker already publishes or has promised (labels of
held servers) and a probe for the host, and picks from the admin's range. The probe is the one
place that touches the host (a bind attempt), passed in so the choice stays testable.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Collection, Mapping


class PortsExhausted(RuntimeError):
    """No free host port is left in the configured range."""


def choose(
    wanted: Collection[str],
    port_range: tuple[int, int],
    in_use: Collection[int],
    previous: Mapping[str, int] | None = None,
    is_free: Callable[[int], bool] = lambda port: True,
) -> dict[str, int]:
    """Name -> host port for each name in ``wanted``.

    A server keeps the ports it had (``previous``) while they are still free, so a student's
    SSH config or TensorBoard bookmark survives a restart; new ports are the lowest free ones.
    """
    low, high = port_range
    if not 0 < low <= high < 65536:
        raise ValueError(f"port range {low}-{high} is not within 1-65535")
    taken = set(in_use)
    chosen: dict[str, int] = {}
    previous = previous or {}
    for name in sorted(wanted):
        port = previous.get(name)
        if port is not None and low <= port <= high and port not in taken and is_free(port):
            chosen[name] = port
            taken.add(port)
    candidate = low
    for name in sorted(wanted):
        if name in chosen:
            continue
        while candidate <= high and (candidate in taken or not is_free(candidate)):
            candidate += 1
        if candidate > high:
            raise PortsExhausted(
                f"no free host port is left in {low}-{high} for {name!r}: an admin should widen "
                "port_range or free some servers"
            )
        chosen[name] = candidate
        taken.add(candidate)
    return chosen


def host_port_free(port: int, address: str = "0.0.0.0") -> bool:
    """True when nothing on the host listens on ``port`` (TCP): a bind probe, closed at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True
