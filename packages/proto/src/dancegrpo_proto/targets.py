"""gRPC target strings: which replica addresses a target stands for.

gRPC resolves ``dns:[//authority/]host[:port]`` and targets without a known scheme
(``host:port``) through DNS, takes ``ipv4:a,b``/``ipv6:a,b`` as literal address lists, and
leaves other schemes (``unix:``, ``xds:``, ...) to their own resolvers. ``RewardClient``
uses this to ask every replica behind a target for its health.
"""

from __future__ import annotations

import socket

_OPAQUE_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")


def _split_host_port(authority: str, default_port: str = "443") -> tuple[str, str]:
    """``"host:port"``, ``"[v6]:port"`` or ``"host"`` → ``(host, port)``."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else default_port
    host, sep, port = authority.rpartition(":")
    if not sep or ":" in host:  # no port, or a bare IPv6 address
        return authority, default_port
    return host, port


def _dns_name(target: str) -> str | None:
    """The ``host:port`` a DNS-resolved target names, or ``None`` for other schemes."""
    if target.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]  # drop the (DNS server) authority
        return rest
    if target.startswith(("ipv4:", "ipv6:", *_OPAQUE_SCHEMES)):
        return None
    return target  # gRPC resolves a target without a known scheme through DNS


def host_name(target: str) -> str | None:
    """The host a DNS-resolved target names (for TLS name checks), else ``None``."""
    name = _dns_name(target)
    return None if name is None else _split_host_port(name)[0]


def replica_addresses(target: str) -> list[str]:
    """Each address ``target`` resolves to, as a single-address gRPC target.

    ``ipv4:a,b`` → ``["ipv4:a", "ipv4:b"]``; ``dns:``/``host:port`` → one ``ipv4:``/``ipv6:``
    target per address ``getaddrinfo`` returns; anything else (``unix:``, or a name that does
    not resolve now) → ``[target]``.
    """
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return [scheme + address for address in target[len(scheme) :].split(",") if address]
    name = _dns_name(target)
    if name is None:
        return [target]
    host, port = _split_host_port(name)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return [target]
    addresses = []
    for family, _, _, _, sockaddr in infos:
        if family == socket.AF_INET:
            address = f"ipv4:{sockaddr[0]}:{sockaddr[1]}"
        elif family == socket.AF_INET6:
            address = f"ipv6:[{sockaddr[0]}]:{sockaddr[1]}"
        else:
            continue
        if address not in addresses:
            addresses.append(address)
    return addresses or [target]
