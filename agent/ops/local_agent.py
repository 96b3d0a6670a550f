"""How the commands reach the running agent: its URL from the config, and an opener
that ignores $http_proxy (meant for the internet, never for loopback) and follows no
redirect."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from agent import paths
from agent.settings import Config


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The agent never redirects: a 3xx at its address is another server's, raised as the
    HTTPError it is (``opened``: NotOutpost), not followed to a third."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def agent_url(cfg: Config, path: str) -> str:
    """The running agent's URL for ``path`` (a wildcard listen address is reached on
    loopback)."""
    host = cfg.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{cfg.listen.port}{path}"


class NotOutpost(ValueError):
    """Something answered at the agent's address, but not as an Outpost agent would (another
    server holds the port): never shown or saved as the agent's answer."""

    def __init__(self, cfg: Config, path: str) -> None:
        super().__init__(f"{agent_url(cfg, '')} answered {path.split('?')[0]}, "
                         "but not an Outpost agent")


class Refused(ValueError):
    """The agent answered ``path`` with an error of its own (a JSON ``{"error": ...}``)."""

    def __init__(self, cfg: Config, path: str, why: str) -> None:
        super().__init__(f"the agent at {agent_url(cfg, '')} refused {path.split('?')[0]}: {why}")
        self.why = why


class CutShort(ConnectionError):
    """What holds the agent's address began an answer to ``path`` and closed before its end
    (an agent stopped or killed mid-answer): http.client's IncompleteRead, say, which is
    neither an OSError nor a URLError, or a reset (an OSError that, once an answer began,
    does not mean that no agent is there)."""

    def __init__(self, cfg: Config, path: str, exc: Exception) -> None:
        super().__init__(f"the answer of {agent_url(cfg, '')} to {path.split('?')[0]} was cut "
                         f"short ({type(exc).__name__}): the agent stopped mid-answer, or "
                         "another server holds its port; try again")


def read_whole(cfg: Config, resp: Any, path: str) -> bytes:
    """The body of ``resp``, the answer to ``path``; CutShort if it ends early."""
    try:
        return bytes(resp.read())
    except TimeoutError:
        raise   # not cut short: the agent is there, and busy (``timed_out``)
    except (http.client.HTTPException, OSError) as exc:
        raise CutShort(cfg, path, exc) from exc


def opened(cfg: Config, req: urllib.request.Request | str, path: str, timeout: float) -> Any:
    """``DIRECT.open(req)``; NotOutpost when what holds the agent's port does not speak
    HTTP (an SSH server's banner: http.client's BadStatusLine, neither a URLError nor an
    OSError), Refused or NotOutpost for an HTTP error (see ``_refusal``)."""
    try:
        return DIRECT.open(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise Refused(cfg, path, _refusal(cfg, path, exc)) from exc
    except http.client.HTTPException as exc:
        if isinstance(exc, OSError):   # RemoteDisconnected: closed unanswered, as by an agent
            raise
        raise NotOutpost(cfg, path) from exc


def _refusal(cfg: Config, path: str, exc: urllib.error.HTTPError) -> str:
    """What the agent said refusing ``path``: its refusals are JSON ``{"error": ...}``;
    NotOutpost for any other error page (another server holds the port)."""
    try:
        why = json.loads(exc.read())["error"]
    except (ValueError, RecursionError, KeyError, TypeError, OSError,
            http.client.HTTPException):   # RecursionError: JSON nested past the parser's depth
        why = None
    if not isinstance(why, str):
        raise NotOutpost(cfg, path) from exc
    return why


def answer(cfg: Config, path: str, body: bytes, expect: str,
           kind: type) -> dict[str, Any]:
    """The agent's JSON object answer to ``path``, which holds ``expect`` of ``kind``;
    NotOutpost if ``body`` is not one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):   # a router's page, say; JSON nested too deep
        data = None
    # A count that is no number is another server's JSON: printed, it would be shown (its
    # escape sequences too) as what the agent did.
    if not isinstance(data, dict) or expect not in data or not isinstance(data[expect], kind):
        raise NotOutpost(cfg, path)
    return data


def timed_out(exc: BaseException) -> bool:
    """Whether a request failed by waiting too long, not by finding no agent: something
    took the connection (the kernel accepts for an agent whose loop is busy) but did not
    answer in time. urllib raises a read's timeout bare, a connect's inside a URLError."""
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None),
                                                       TimeoutError)


def busy(cfg: Config, path: str, seconds: float) -> str:
    """One line for an agent that took the connection but did not answer ``path`` within
    ``seconds`` (``timed_out``): there, busy, not absent."""
    return (f"the agent at {agent_url(cfg, '')} is busy: no answer to {path.split('?')[0]} "
            f"in {seconds:g} s; try again")


def why_not(exc: BaseException) -> str:
    """Why a request got no agent's answer, in the system's words for a socket's error
    (not urllib's wrapping of them, "<urlopen error [Errno 111] ...>")."""
    reason = getattr(exc, "reason", exc)   # a URLError holds the socket's error
    return reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)


def port_unknown(cfg: Config) -> str | None:
    """Why no command can reach an agent whose listen.port is 0 (valid: tests use it), or
    None for a fixed port."""
    if cfg.listen.port:
        return None
    return ("listen.port = 0 has the system pick the agent's port at each start, which no "
            "command can know: set listen.port to a fixed port (8765 by default), then "
            "restart the agent; until then its log's 'listening on' line names its port")


def running_elsewhere(cfg: Config, why: str) -> str | None:
    """One line for an agent that runs on the configured spool but did not answer at the
    configured address (``why``): it has not bound its port yet (a migration at start), or
    has closed it and is finishing its graceful stop (up to about 17 s, the spool still
    held), or listen.host or listen.port changed since it started, which applies at a
    restart, or listen.port is 0. None if no agent runs on the spool."""
    spool = cfg.storage.resolved_path()
    if not paths.agent_holds(spool):
        return None
    if unknown := port_unknown(cfg):
        return f"an agent is running on the spool {spool}, but {unknown}"
    return (f"an agent is running on the spool {spool} but does not answer at "
            f"{agent_url(cfg, '')} ({why}): it is still starting (opening the spool) or "
            "stopping (finishing what it has in flight), or it listens where its config said "
            "when it started (a change to listen.host or listen.port applies at a restart); "
            "or name its config with --config")


def not_answering(cfg: Config, exc: BaseException) -> str:
    """One line for a request no agent answered (refused, unreachable): the system's words
    for why, not urllib's wrapping of them ("<urlopen error [Errno 111] ...>")."""
    why = why_not(exc)
    if elsewhere := running_elsewhere(cfg, why):
        return elsewhere
    if unknown := port_unknown(cfg):
        return f"no agent answering: {unknown}"
    return (f"no agent answering at {agent_url(cfg, '')} ({why}): start it (`outpost run`, "
            "or the service), or name its config with --config")
