"""The prober's guard and classification, without a network: a non-public target makes no
socket and takes no slot; each errno maps as nmap's connect scan maps it (the errnos a
namespace cannot produce, EPERM, EHOSTDOWN, ETIMEDOUT, are here; the others are measured
for real in tests/integration/test_probe.py)."""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from recon_stream.adapters.probe import ProbeError, TcpProber
from recon_stream.domain.verification import CheckReason, CheckState, NotCheckable


@dataclass
class Slot:
    late: bool = False
    entered_at: float | None = None
    abandoned: bool = False

    @property
    def wait(self) -> float:
        return 0.0

    def enter(self) -> bool:
        if self.late:
            return False
        self.entered_at = 0.0
        return True

    def abandon(self) -> None:
        self.abandoned = True


@dataclass
class Budget:
    """Hands out slots; the first `late` of them are reached too late."""

    late: int = 0
    slots: list[Slot] = field(default_factory=list)

    async def reserve(self) -> Slot:
        slot = Slot(late=len(self.slots) < self.late)
        self.slots.append(slot)
        return slot


class FakeSocket:
    """A socket whose connect answers `code` at once; records what was done to it."""

    made: list[FakeSocket] = []
    code = 0
    peer = ("81.2.69.142", 3389)
    local = ("10.1.1.1", 40000)

    def __init__(self, family: int, kind: int) -> None:
        self.family, self.kind = family, kind
        self.options: dict[tuple[int, int], bytes] = {}
        self.connected_to: tuple[str, int] | None = None
        self.closed = False
        self.sent = b""
        FakeSocket.made.append(self)

    def setblocking(self, flag: bool) -> None:
        assert flag is False

    def setsockopt(self, level: int, name: int, value: bytes) -> None:
        self.options[level, name] = value

    def connect_ex(self, address: tuple[str, int]) -> int:
        self.connected_to = address
        return self.code

    def getsockname(self) -> tuple[str, int]:
        return self.local

    def getpeername(self) -> tuple[str, int]:
        return self.peer

    def send(self, data: bytes) -> int:
        self.sent += data
        return len(data)

    def close(self) -> None:
        self.closed = True


@pytest_asyncio.fixture
async def fake_socket(monkeypatch: pytest.MonkeyPatch) -> type[FakeSocket]:
    FakeSocket.made = []
    FakeSocket.code = 0
    FakeSocket.local = ("10.1.1.1", 40000)
    FakeSocket.peer = ("81.2.69.142", 3389)
    # An async fixture: the test's event loop has made its own sockets before the patch,
    # so only the prober meets the fake.
    monkeypatch.setattr(socket, "socket", FakeSocket)
    return FakeSocket


NOT_PUBLIC = [
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "100.64.0.1",
    "127.0.0.1",
    "169.254.169.254",
    "192.0.2.1",
    "198.51.100.7",
    "203.0.113.9",
    "0.0.0.0",
    "224.0.0.1",
    "255.255.255.255",
    "::1",
    "fe80::1",
    "fc00::1",
    "2001:db8::1",
    "::ffff:10.0.0.1",
    "not-an-ip",
    "081.2.69.142",
]


@pytest.mark.parametrize("ip", NOT_PUBLIC)
async def test_a_non_public_target_makes_no_socket_and_takes_no_slot(
    ip: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        pytest.fail(f"a socket was made for {ip}")

    budget = Budget()
    prober = TcpProber(0.5, budget)
    with monkeypatch.context() as patch:
        # Everywhere, not just in the prober: nothing may make a socket for it.
        patch.setattr(socket, "socket", forbidden)
        patch.setattr(socket, "create_connection", forbidden)
        with pytest.raises(NotCheckable):
            await prober.check(ip, 80)
    assert budget.slots == []


async def test_a_bad_port_is_refused_before_anything(fake_socket: type[FakeSocket]) -> None:
    budget = Budget()
    for port in (0, -1, 65536):
        with pytest.raises(ValueError, match="port"):
            await TcpProber(0.5, budget).check("81.2.69.142", port)
    assert fake_socket.made == []
    assert budget.slots == []


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (0, CheckReason.CONN_ACCEPT),
        (errno.ECONNREFUSED, CheckReason.CONN_REFUSED),
        (errno.ETIMEDOUT, CheckReason.NO_RESPONSE),
        (errno.EHOSTDOWN, CheckReason.NO_RESPONSE),
        (errno.EHOSTUNREACH, CheckReason.HOST_UNREACH),
        (errno.ENETUNREACH, CheckReason.NET_UNREACH),
        (errno.EACCES, CheckReason.ADMIN_PROHIBITED),
        (errno.EPERM, CheckReason.ADMIN_PROHIBITED),
    ],
)
async def test_each_connect_result_is_classified_as_nmap_does(
    fake_socket: type[FakeSocket], code: int, reason: CheckReason
) -> None:
    fake_socket.code = code
    check = await TcpProber(0.5, Budget()).check("81.2.69.142", 3389)
    assert (check.ip, check.port, check.reason) == ("81.2.69.142", 3389, reason)
    assert check.rtt_ms is not None
    assert check.rtt_ms >= 0
    assert check.checked_at.tzinfo is not None
    (sock,) = fake_socket.made
    assert sock.connected_to == ("81.2.69.142", 3389)
    assert sock.kind == socket.SOCK_STREAM
    assert sock.family == socket.AF_INET
    # Closed with a reset (SO_LINGER on, 0 s), nothing sent.
    linger = sock.options[socket.SOL_SOCKET, socket.SO_LINGER]
    assert struct.unpack("ii", linger) == (1, 0)
    assert sock.closed
    assert sock.sent == b""


@pytest.mark.parametrize(
    "code", [errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.ENETDOWN, errno.ENONET]
)
async def test_a_local_failure_is_a_probe_error_never_closed(
    fake_socket: type[FakeSocket], code: int
) -> None:
    fake_socket.code = code
    with pytest.raises(ProbeError) as raised:
        await TcpProber(0.5, Budget()).check("81.2.69.142", 3389)
    assert raised.value.errno == code
    assert fake_socket.made[0].closed


async def test_a_self_connect_is_not_open(fake_socket: type[FakeSocket]) -> None:
    fake_socket.local = fake_socket.peer
    with pytest.raises(ProbeError, match="self-connect") as raised:
        await TcpProber(0.5, Budget()).check("81.2.69.142", 3389)
    assert raised.value.errno is None


async def test_an_ipv6_target_uses_an_ipv6_socket(fake_socket: type[FakeSocket]) -> None:
    fake_socket.peer = ("2a00:1450::1", 443)
    check = await TcpProber(0.5, Budget()).check("2a00:1450::1", 443)
    assert check.state is CheckState.OPEN
    assert fake_socket.made[0].family == socket.AF_INET6


async def test_a_slot_reached_too_late_is_forfeited_and_another_taken(
    fake_socket: type[FakeSocket],
) -> None:
    budget = Budget(late=2)
    prober = TcpProber(0.5, budget)
    check = await prober.check("81.2.69.142", 3389)
    assert check.reason is CheckReason.CONN_ACCEPT
    assert len(budget.slots) == 3
    assert prober.missed_slots == 2
    # One connect, through the one slot that let it go.
    assert [s.entered_at is not None for s in budget.slots] == [False, False, True]
    assert len(fake_socket.made) == 1


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout"):
        TcpProber(0, Budget())
