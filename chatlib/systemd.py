"""Tell a service manager how we are doing: the ``sd_notify`` protocol.

When systemd starts the server with ``Type=notify`` it sets ``$NOTIFY_SOCKET``
to a Unix datagram socket; each message is one datagram of ``KEY=value``
lines. Without the variable, :func:`notify` does nothing. No libsystemd
needed: it is one ``sendto``.
"""

import os
import socket


def notify(message):
    """Send ``message`` (e.g. ``"READY=1"``); return True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):               # Linux abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True
