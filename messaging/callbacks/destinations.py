"""Where callbacks may go: not into our own network (SSRF).

A client names the URL; without this check, a callback endpoint at http://10.0.0.5/admin or
http://169.254.169.254/ (a cloud's metadata service) would have our workers POST inside the
network they run in. In production only public (globally routable) addresses are allowed, checked
twice: a literal address or `localhost` when the URL is given (a 400 naming the field), and every
address the host name resolves to when a connection is opened (a 4xx-like final failure, not
retried), connecting to the address that was checked so a second DNS answer cannot differ.
CONDUCTOR_CALLBACK_ALLOW_PRIVATE_NETWORKS=true allows them (the default outside production: a
developer's receiver on 127.0.0.1).
"""

from __future__ import annotations

import ipaddress

from messaging.conf import messaging_setting

LOCAL_NAMES = ("localhost", "localhost.localdomain")


def private_networks_allowed() -> bool:
    return bool(messaging_setting("CALLBACK_ALLOW_PRIVATE_NETWORKS"))


def address_allowed(address: str) -> bool:
    """Whether a connection to this resolved address may be opened in production: a public one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is link-local anyway
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_global and not ip.is_multicast


def host_problem(host: str) -> str | None:
    """Why a URL's host is refused before any DNS look-up (a literal private address, a local
    name), or None. Host names are checked again, resolved, when a connection is opened."""
    if private_networks_allowed():
        return None
    name = host.strip("[]").rstrip(".").lower()
    if name in LOCAL_NAMES or name.endswith(".localhost"):
        return "Callbacks are not sent to localhost in production."
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return None
    if not address_allowed(name):
        return (
            "Callbacks are not sent to private, loopback, link-local or reserved addresses in production "
            "(CONDUCTOR_CALLBACK_ALLOW_PRIVATE_NETWORKS allows them)."
        )
    return None
