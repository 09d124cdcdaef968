"""Whether the dashboard is reachable from other machines, and whether someone chose that.

The dashboard reads any adapter file on this machine by path and starts training jobs, so it
must listen on this machine only unless the user asks otherwise. Streamlit binds every network
interface when `server.address` is not set, which is what happens when it is started from a
folder without the project's `.streamlit/config.toml` (`cd /tmp && streamlit run .../app.py`).
The app cannot rebind its server, so it refuses to serve in that case and says how to restart.

An explicit choice is any `server.address` the user set (a command-line flag such as
`balora dashboard --host`, `--server.address`, $STREAMLIT_SERVER_ADDRESS, or a config file), or
$BALORA_ALLOW_REMOTE=1 (serve on every interface on purpose).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ALLOW_ENV = "BALORA_ALLOW_REMOTE"
UNIX_SOCKET_PREFIX = "unix://"  # a Unix socket is reached through the file system: local only
DEFAULT_DEFINITION = "<default>"  # streamlit.config's where_defined for an option nobody set
# The app's own path: an installed balora has no dashboard/app.py in the folder the user is in.
APP_PATH = Path(__file__).with_name("app.py")
RESTART_HINT = (
    "Restart it with `balora dashboard` (this machine only), or with "
    f"`streamlit run {shlex.quote(str(APP_PATH))} --server.address 127.0.0.1`. To expose it on purpose, pass the address "
    "(`balora dashboard --host 0.0.0.0`, or `--server.address ADDRESS`) or set BALORA_ALLOW_REMOTE=1."
)


@dataclass(frozen=True)
class Exposure:
    """A dashboard served beyond loopback: `allowed` when the user chose it, and what to say."""

    address: str  # what it listens on, "every interface" when server.address is unset
    allowed: bool
    message: str


def is_local(address: str | None) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, localhost) or a Unix socket."""
    if not address:
        return False  # unset: streamlit listens on every interface
    if address.startswith(UNIX_SOCKET_PREFIX) or address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to any interface
        return False


def served_address() -> tuple[str | None, str]:
    """streamlit's effective server.address and where it was set (DEFAULT_DEFINITION: nowhere)."""
    from streamlit import config

    return config.get_option("server.address"), config.get_where_defined("server.address")


def exposure(address: str | None, where_defined: str, environ: dict[str, str] | None = None) -> Exposure | None:
    """None when the dashboard listens on this machine only; else whether that was chosen.

    `address` and `where_defined` as served_address returns them.
    """
    if is_local(address):
        return None
    environ = os.environ if environ is None else environ
    shown = address or "every network interface"
    chosen = bool(address) and where_defined != DEFAULT_DEFINITION
    if chosen or environ.get(ALLOW_ENV) == "1":
        why = f"server.address set by {where_defined}" if chosen else f"{ALLOW_ENV}=1"
        return Exposure(shown, True, (
            f"Served on {shown} ({why}): anyone who can reach this machine can read adapter files on it by path and "
            "start training jobs. Stop it when you are done, or restart with `balora dashboard` for this machine only."
        ))
    return Exposure(shown, False, (
        f"This dashboard is listening on {shown}, which nobody chose: streamlit was started without a "
        "server.address (the project's .streamlit/config.toml is only read when streamlit starts in the "
        f"repository's root folder). It refuses to serve pages from this address. {RESTART_HINT}"
    ))


def foreign_host(host_header: str | None, address: str, environ: dict[str, str] | None = None) -> str | None:
    """For a dashboard listening on this machine only (at `address`): the name in a page request's Host
    header when it is not this machine's, else None. DNS rebinding: a web site makes its own name resolve to 127.0.0.1,
    and the browser, seeing one origin, lets the site's script use the dashboard (streamlit refuses other
    origins only). A browser always sends Host, and the name in the address bar is what it sends: an SSH
    tunnel's `localhost` passes. $BALORA_ALLOW_REMOTE=1 accepts any (a reverse proxy forwarding its name)."""
    environ = os.environ if environ is None else environ
    if not host_header or environ.get(ALLOW_ENV) == "1" or address.startswith(UNIX_SOCKET_PREFIX):
        return None  # no Host: not a browser; a Unix socket: no browser reaches it but through a proxy
    try:
        name = urlsplit(f"//{host_header}").hostname or ""
    except ValueError:  # not even a host name
        name = ""
    return None if is_local(name) or name.endswith(".localhost") else host_header  # *.localhost: loopback by RFC 6761


def foreign_host_message(host_header: str) -> str:
    return (f"This dashboard listens on this machine only, and this page was asked for as {host_header}, a name that "
            "is not this machine's (a web site can make its name lead here): it refuses to serve it. Open "
            "http://localhost:PORT or http://127.0.0.1:PORT instead. Behind a reverse proxy that forwards its "
            f"own name, set {ALLOW_ENV}=1.")


def current(environ: dict[str, str] | None = None) -> Exposure | None:
    """exposure() of the running server."""
    return exposure(*served_address(), environ)
