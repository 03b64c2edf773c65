"""The port a test or benchmark server gets: free, and out of the range the kernel gives to outgoing connections."""

import random
import socket

from sglang_mux import server_process
from sglang_mux.server_process import PORT_RANGE, ephemeral_port_start, free_port


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_free_port_is_below_the_ephemeral_range_and_free():
    ports = {free_port() for _ in range(20)}
    start = ephemeral_port_start()
    assert all(PORT_RANGE[0] <= p <= PORT_RANGE[1] and p < start for p in ports), (sorted(ports), start)
    assert all(bindable(p) for p in ports)
    assert len(ports) > 1  # drawn at random, not one fixed port every call


def test_free_port_skips_a_port_something_listens_on():
    first = free_port(random.Random(7))
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        again = free_port(random.Random(7))  # the same draw, whose first pick is now taken
    assert again != first and PORT_RANGE[0] <= again <= PORT_RANGE[1]


def test_free_port_falls_back_to_any_free_port_when_the_range_is_ephemeral(monkeypatch):
    real_start = ephemeral_port_start()
    monkeypatch.setattr(server_process, "ephemeral_port_start", lambda: PORT_RANGE[0])  # no room under it
    port = free_port()
    assert port >= real_start and bindable(port)  # bind(0): the kernel's pick, from its ephemeral range
