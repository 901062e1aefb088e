"""A delay on a host's link, in user space: a TCP relay that holds every chunk it reads for the link's delay before
passing it on, for ``sllm_eval.hosts`` (this kernel has no netem, and nftables here has no ``queue`` statement for
NFQUEUE).

One relay process serves one host. Its main thread stays in the caller's network namespace (so ``ip netns pids``
does not list it and :meth:`Host.kill_all` leaves the link's relay alive, as a dead host leaves its cable); a worker
thread enters the host's namespace with ``setns`` and runs an asyncio loop there with two listening sockets:

- **out**: TCP connections the host opens through ``eth0`` are redirected here (nftables ``redirect`` in the
  host's ``output`` nat chain); the relay reads the original destination (``SO_ORIGINAL_DST``) and connects to it
  with a socket mark the redirect rule skips.
- **in**: TCP connections arriving on ``eth0`` are redirected here (``prerouting``); the relay connects to the
  original destination, the host's own address, through ``lo``.

So every TCP byte that crosses a link with a delay D waits D in that link's relay, each way; a connection between
two hosts crosses two links and waits for both (the hosts hang off one bridge, as machines off one switch).

What it does not model: the relay terminates TCP, so the kernel's retransmission timers see the bare link's round
trip, not the delayed one (a lost segment is recovered faster than it would be on a real 20 ms link); loss
(``nft`` ``numgen`` drops on ``eth0``) still costs retransmissions and reordering on the link between two relays.

Protocol on stdin (one command a line; each answered on stdout once in effect): ``delay MS`` -> ``ok``. The first
line out is ``ready IN_PORT OUT_PORT``. The relay exits when stdin closes (its owner is gone).

    python -m sllm_eval.link_relay --netns NAME [--mark 0x511]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import socket
import struct
import sys
import threading
from typing import Any

__all__ = ["RELAY_MARK", "main"]

RELAY_MARK = 0x511
"""The socket mark on the relay's own outgoing connections: the host's redirect rule lets marked packets pass."""
SO_ORIGINAL_DST = 80
CLONE_NEWNET = 0x40000000
CHUNK = 64 << 10
WINDOW = 8 << 20
"""Bytes a direction may hold at once before the relay stops reading (20 ms of 3 Gbit/s): the sender's TCP window
then fills, as on a real link, instead of the relay's memory."""


def _enter_netns(name: str) -> None:
    """Move the calling thread (only) into the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


class Relay:
    """The asyncio side: both listeners, every relayed connection, the current delay."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.delay_s = 0.0
        self.loop = asyncio.new_event_loop()
        self.ports: tuple[int, int] = (0, 0)
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        inbound = await asyncio.start_server(self._accept, "0.0.0.0", 0, reuse_address=True)
        outbound = await asyncio.start_server(self._accept, "0.0.0.0", 0, reuse_address=True)
        self.ports = (inbound.sockets[0].getsockname()[1], outbound.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self.tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            dst = _original_dst(writer.get_extra_info("socket"))
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.setblocking(False)
            await self.loop.sock_connect(up, dst)
            up_reader, up_writer = await asyncio.open_connection(sock=up)
        except OSError:
            writer.transport.abort()  # the far side refused or is unreachable: so is the relayed connection
            return
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer)),
                 asyncio.ensure_future(self._pump(up_reader, writer))]
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.exception() is not None for t in done):
                raise ConnectionResetError
            await asyncio.gather(*pumps)
        except (OSError, asyncio.CancelledError):
            for t in pumps:
                t.cancel()
            writer.transport.abort()  # a reset on one side is a reset on the other
            up_writer.transport.abort()
        else:
            writer.close()
            up_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk written ``delay`` after it was read, in order; EOF passes on likewise."""
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        held = 0
        room = asyncio.Event()
        room.set()

        async def read() -> None:
            nonlocal held
            while True:
                await room.wait()
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    queue.put_nowait((self.loop.time(), None))  # a reset passes on at once: nothing to hold
                    return
                queue.put_nowait((self.loop.time() + self.delay_s, data))
                if not data:
                    return
                held += len(data)
                if held >= WINDOW:
                    room.clear()

        reading = asyncio.ensure_future(read())
        try:
            while True:
                due, data = await queue.get()
                wait = due - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    raise ConnectionResetError("the other side reset the connection")
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                held -= len(data)
                if held < WINDOW:
                    room.set()
        finally:
            reading.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netns", required=True)
    parser.add_argument("--mark", type=lambda s: int(s, 0), default=RELAY_MARK)
    args = parser.parse_args(argv)
    relay = Relay(args.mark)
    started = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            _enter_netns(args.netns)
            asyncio.set_event_loop(relay.loop)
            relay.loop.run_until_complete(relay.start())
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread, which exits non-zero)
            failed.append(exc)
            started.set()
            return
        started.set()
        relay.loop.run_forever()

    worker = threading.Thread(target=run, daemon=True, name=f"relay-{args.netns}")
    worker.start()
    started.wait()
    if failed:
        print(f"error: {failed[0]}", flush=True)
        return 1
    print(f"ready {relay.ports[0]} {relay.ports[1]}", flush=True)

    def set_delay(ms: float, done: threading.Event) -> None:
        relay.delay_s = ms / 1000
        done.set()

    for line in sys.stdin:
        words = line.split()
        if len(words) == 2 and words[0] == "delay":
            done = threading.Event()
            relay.loop.call_soon_threadsafe(set_delay, float(words[1]), done)
            done.wait(10)
            print("ok", flush=True)
        elif words:
            print(f"error: unknown command {line.strip()!r}", flush=True)
    return 0  # stdin closed: the owner is gone; the daemon thread dies with the process


if __name__ == "__main__":
    sys.exit(main())
