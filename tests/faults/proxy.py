"""A TCP proxy on 127.0.0.1 that a test puts between a consumer and its PostgreSQL, and controls:
pass-through, cut (every connection closed, new ones refused), blackhole (connections accepted and
kept open, nothing forwarded either way) and restore.

    with Proxy(upstream_port) as proxy:
        dsn = server.dsn(db, port=str(proxy.port))
        proxy.cut(); proxy.restore(); proxy.blackhole(); proxy.restore()

Pure Python threads: one accepting, two per connection (one per direction). Under a blackhole a
thread holds what it has read until the network comes back (as TCP would retransmit it), and
connections accepted meanwhile reach the server only then. Note that the proxy's kernel still
acknowledges what the consumer sends, so a blackhole here looks to the consumer like a server that
has stopped answering (keepalives and tcp_user_timeout see a live peer): only the consumer's own
deadlines get it out."""

from __future__ import annotations

import socket
import threading
from typing import Literal

Mode = Literal["pass", "cut", "blackhole"]


class _Link:
    """One proxied connection: the client's socket and the server's."""

    def __init__(self, client: socket.socket):
        self.client = client
        self.server: socket.socket | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.server):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class Proxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self._changed = threading.Condition()
        self._links: set[_Link] = set()
        self._stopped = False
        self.accepted = 0           # connections accepted since the start (for assertions)
        self._listener: socket.socket | None = self._listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        listener.settimeout(0.1)
        return listener

    # --- what the test controls -----------------------------------------------------------------

    def cut(self) -> None:
        """Close every connection and refuse new ones (the port stops listening)."""
        with self._changed:
            self.mode = "cut"
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            links, self._links = self._links, set()
            self._changed.notify_all()
        for link in links:
            link.close()

    def blackhole(self) -> None:
        """Keep every connection open and accept new ones, but forward nothing either way."""
        with self._changed:
            self.mode = "blackhole"
            self._changed.notify_all()

    def restore(self) -> None:
        """Back to pass-through: held bytes and held connections flow again."""
        with self._changed:
            if self._listener is None:
                self._listener = self._listen(self.port)
            self.mode = "pass"
            self._changed.notify_all()

    def drop_connections(self) -> None:
        """Close every current connection (a network reset) and stay in the current mode."""
        with self._changed:
            links, self._links = self._links, set()
        for link in links:
            link.close()

    def connections(self) -> int:
        with self._changed:
            return sum(1 for link in self._links if not link.closed)

    def close(self) -> None:
        with self._changed:
            self._stopped = True
            self.mode = "cut"
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            links, self._links = self._links, set()
            self._changed.notify_all()
        for link in links:
            link.close()
        self._acceptor.join(5)

    # --- the threads ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            with self._changed:
                if self._stopped:
                    return
                listener = self._listener
            if listener is None:
                with self._changed:
                    self._changed.wait(0.1)
                continue
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:          # closed by cut() under our feet
                continue
            client.settimeout(None)
            link = _Link(client)
            with self._changed:
                if self.mode == "cut" or self._stopped:
                    link.close()
                    continue
                self._links.add(link)
                self.accepted += 1
            threading.Thread(target=self._connect, args=(link,), name="proxy-link", daemon=True).start()

    def _wait_pass(self, link: _Link) -> bool:
        """Block while blackholed; False once the link is closed or the proxy cut."""
        with self._changed:
            while self.mode == "blackhole" and not link.closed:
                self._changed.wait(0.5)
            return self.mode == "pass" and not link.closed

    def _connect(self, link: _Link) -> None:
        if not self._wait_pass(link):
            link.close()
            return
        try:
            link.server = socket.create_connection(self.upstream, timeout=10)
            link.server.settimeout(None)
        except OSError:
            link.close()
            return
        if link.closed:          # cut while connecting
            link.close()
            return
        threading.Thread(target=self._pump, args=(link, link.server, link.client), daemon=True).start()
        self._pump(link, link.client, link.server)

    def _pump(self, link: _Link, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not self._wait_pass(link):
                    break
                target.sendall(data)
        except OSError:
            pass
        link.close()
        with self._changed:
            self._links.discard(link)
