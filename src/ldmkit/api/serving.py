"""`serve`: the local web page over a folder of runs (the page itself: `ldmkit.web`).

    server = api.open_server("runs")        # checks, binds the port; nothing served yet
    print(server.url, server.warning or "")
    server.run()                             # until Ctrl-C

or `api.serve("runs")`, which does both.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from .checks import check_count, check_path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


@dataclass
class Server:
    """A web page ready to serve: its app, the listening socket, its address and, when it is
    reachable from other machines, the warning to show."""

    app: Any
    sock: socket.socket
    url: str
    warning: str | None

    def run(self) -> None:
        """Serve until Ctrl-C."""
        from ..web import app as web

        web.serve(self.app, self.sock)


def open_server(
    runs: str | os.PathLike = "runs",
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str | None = None,
    data_root: str | os.PathLike | None = None,
    train_config: str | None = None,
) -> Server:
    """Check the arguments, build the page over the runs under `runs` and bind host:port.
    `data_root`: the folder whose data the page's New run form may train on (None: built-in
    data only); `train_config`: the config file its trainings start from."""
    check_count("--port", port, 1, 65535)
    check_path("--runs", runs)
    check_path("--host", host)
    check_path("--data-root", data_root)
    check_path("--train-config", train_config)
    try:
        from ..web import app as web
    except ImportError as e:
        raise ConfigError(
            f"ldmkit serve needs Starlette and uvicorn ({e.name} is missing); install them with "
            "pip install -e '.[serve]'"
        ) from None
    # on a loopback address, the page answers to its own names only (no DNS rebinding)
    hosts = (*web.LOOPBACK, host) if web.is_loopback(host) else None
    app = web.create_app(runs, device=device, hosts=hosts, data_root=data_root,
                         train_config=train_config)  # fmt: skip
    sock = web.listen(host, port)
    warning = None
    if not web.is_loopback(host):
        warning = (
            f"--host {host} lets other machines on the network use this page (sample, and "
            "stop trainings) without a password; serve on 127.0.0.1 unless you mean it"
        )
    shown = f"[{host}]" if ":" in host else host
    return Server(app, sock, f"http://{shown}:{sock.getsockname()[1]}/", warning)


def serve(runs: str | os.PathLike = "runs", **kwargs: Any) -> None:
    """`open_server(runs, **kwargs).run()`: serve the page until Ctrl-C."""
    open_server(runs, **kwargs).run()
