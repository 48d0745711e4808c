"""The job's store listens on the address it was given, never on every address.

torch 2.13's TCPStore server listens on all addresses of its machine (``[::]``, dual-stack;
both its libuv and its classic backend) whatever host name it is given; only a socket
passed in (``master_listen_fd``) makes it listen on one. So where a moemesh rank hosts the
job's store (rank 0 under srun, deepspeed, mpirun, or ranks started by hand), it binds that
socket itself, to the address ``MASTER_ADDR`` resolves to, and refuses in one line an
address the other nodes could not reach: a loopback address in a job that spans nodes (a
host name that /etc/hosts maps to 127.0.1.1 is the common case), or, with
``cluster.interface``, an address that is not on that interface.

torchrun's own stores are torchrun's: its agent listens on all addresses (the static
``--master_addr`` form and the c10d rendezvous alike). ``python -m moemesh.launch.store serve
ADDR:PORT`` hosts a c10d rendezvous store on one address instead; docs/multinode.md shows the
torchrun line that uses it. ``python -m moemesh.launch.store address IFACE`` prints the
interface's IPv4 address (the SLURM batch script exports it as ``MASTER_ADDR``).
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import socket
import struct
import sys
from pathlib import Path

from moemesh.errors import ConfigError

_SIOCGIFADDR = 0x8915  # Linux: the interface's (first) IPv4 address


def interface_addresses(name: str) -> list[str]:
    """The IPv4 and IPv6 addresses of the network interface ``name`` (Linux); [] if it has none
    or does not exist."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            out.append(socket.inet_ntoa(packed[20:24]))
        except OSError:
            pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines()[:4096]:
            fields = line.split()
            if len(fields) == 6 and fields[5] == name:
                out.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    except OSError:
        pass
    return out


def resolve(host: str) -> str:
    """The address a store for ``host`` listens on: the first that ``host`` resolves to (the
    one clients try first). ConfigError if it resolves to none."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as err:
        raise ConfigError(f"MASTER_ADDR={host} does not resolve here: {err}") from None
    return str(infos[0][4][0])


def check_store_address(host: str, address: str, *, spans_nodes: bool, interface: str | None) -> None:
    """ConfigError where the other ranks could not reach a store listening on ``address``."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        raise ConfigError(
            f"MASTER_ADDR={host}: the store would listen on every address of rank 0's node; give the address "
            "the ranks reach it at (this node's address on the cluster network; 127.0.0.1 on one node)"
        )
    if spans_nodes and ip.is_loopback:
        raise ConfigError(
            f"MASTER_ADDR={host} resolves to {address} on rank 0's node, but the job spans several nodes: "
            "the other nodes cannot reach it there; set MASTER_ADDR to this node's address on the cluster "
            "network (or set cluster.interface), or fix /etc/hosts"
        )
    if interface is not None:
        on_interface = interface_addresses(interface)
        if address not in on_interface:
            have = ", ".join(on_interface) or "no address here"
            raise ConfigError(
                f"MASTER_ADDR={host} resolves to {address}, which is not an address of cluster.interface="
                f"{interface} ({have}): the store would listen on another network than the ranks talk on; "
                f"set MASTER_ADDR to {on_interface[0] if on_interface else 'an address of ' + interface}"
            )


def listen_on(host: str, port: int, *, spans_nodes: bool, interface: str | None = None) -> socket.socket:
    """A listening socket on ``host``'s address (not on all addresses) for the job's store."""
    address = resolve(host)
    check_store_address(host, address, spans_nodes=spans_nodes, interface=interface)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"MASTER_ADDR={host} MASTER_PORT={port}: rank 0 cannot listen on {address} port {port}: "
            f"{err.strerror or err}; MASTER_ADDR must be an address of rank 0's node and the port free"
        ) from None
    return sock


def job_store(
    host: str,
    port: int,
    world_size: int,
    *,
    is_master: bool,
    timeout_s: float,
    spans_nodes: bool,
    interface: str | None = None,
):
    """The job's TCPStore: rank 0 hosts it on ``host``'s address only; the other ranks connect
    (waiting up to ``timeout_s`` for it)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout)
    sock = listen_on(host, port, spans_nodes=spans_nodes, interface=interface)
    return dist.TCPStore(
        host, port, world_size, True, timeout=timeout, wait_for_workers=True, master_listen_fd=sock.detach()
    )


def _serve(endpoint: str) -> None:
    """Host a store for torchrun's c10d rendezvous on one address until stopped (SIGTERM/Ctrl-C)."""
    import signal

    import torch.distributed as dist

    host, _, port_text = endpoint.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit():
        raise ConfigError(f"serve {endpoint}: expected ADDRESS:PORT, e.g. 10.0.0.1:29400")
    sock = listen_on(host, int(port_text), spans_nodes=True)
    store = dist.TCPStore(
        host,
        int(port_text),
        None,
        True,
        timeout=datetime.timedelta(seconds=300),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
    )
    print(f"moemesh: rendezvous store on {resolve(host)}:{port_text} (Ctrl-C or SIGTERM stops it)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    del store


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 2 and args[0] == "address":
            found = [a for a in interface_addresses(args[1]) if ":" not in a]
            if not found:
                raise ConfigError(f"cluster.interface={args[1]}: no IPv4 address on this node (ip -4 addr shows them)")
            print(found[0])
            return 0
        if len(args) == 2 and args[0] == "serve":
            _serve(args[1])
            return 0
    except ConfigError as err:
        print(f"moemesh: {err}", file=sys.stderr)
        return 2
    print("usage: python -m moemesh.launch.store address IFACE | serve ADDRESS:PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
