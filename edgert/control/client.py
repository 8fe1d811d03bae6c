"""edgert.Client: drive a device service (`edgert serve`) from another process.

    with edgert.Client("ipc:///run/user/1000/edgert/edgert.sock") as c:
        c.hello()                                   # protocol, version, models
        out = c.infer({"image": x}, task="lane")    # dict of arrays, like TaskModel.run
        for piece in c.generate("import os\\n", stream=True):
            print(piece, end="")

Reliability is the zguide's Lazy Pirate: a request that hears nothing for ``timeout``
seconds (the service beats while work is queued or running, so a long op is not silence)
closes the socket, backs off, reconnects and sends again, up to ``retries`` times, then
raises ServiceUnavailable. Ops that change the service (load, unload, reload, shutdown)
are never sent twice: a silent one raises at once, since it may have been applied.

Every call (and every ``next()`` of a stream) is bounded: it returns or raises within
``timeout x (retries + 1)`` seconds, backoff included, of when it began or the service last
spoke of it. No send blocks (libzmq drops a connection's queue when its handshake fails),
and a handshake that libzmq reports failed (a refused key, a wrong server key, CURVE on one
side only) raises ServiceUnavailable at once, naming the endpoint.

Threads: one lock serialises the socket, so a client may be shared, but its calls then
take turns. For parallel requests, use one client per thread.
"""
from __future__ import annotations

import itertools
import os
import struct
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import zmq

from ..errors import (BudgetExceeded, ConfigError, EdgertError, InputMismatch, ModelClosed,
                      PackCorrupt, UnknownTask, UnsupportedModel)
from .protocol import PROTOCOL, ProtocolError, decode_reply, encode_request

# NOTE: the service beats every 0.5 s while a caller's work is queued or running, so 2 s of
# silence is four missed beats: no service, not slow work. One resend covers a service that
# restarts under us; a client with no service raises after about 4 s (it was 21 s).
TIMEOUT_S = 2.0
RETRIES = 1
BACKOFF_S = 0.1          # first wait before a resend, doubled each time
BACKOFF_MAX_S = 2.0
POLL_SLICE_S = 0.05      # a waiting thread lets go of the socket this often
# NOTE: one dropped handshake may be a service restarting under us; two running mean the
# peer rejects this client before ZAP does (with CURVE: a wrong server public key)
HANDSHAKE_DROPS = 2
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_MONITORS = itertools.count()   # inproc names of the sockets' monitors, unique per process


class ServiceUnavailable(EdgertError):
    """The service did not answer (not running, unreachable, or refused this client's key)."""


class RemoteError(EdgertError):
    """The service answered with an error; ``code`` is one of protocol.CODES. Where edgert
    has a type for the error, the exception is also an instance of it (a remote unknown
    task is an ``edgert.UnknownTask``), without that type's extra attributes."""

    def __init__(self, code: str, message: str, rid: int | None = None):
        Exception.__init__(self, message)
        self.code, self.message, self.id = code, message, rid

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


_LOCAL = {"unknown_task": UnknownTask, "input_mismatch": InputMismatch,
          "budget_exceeded": BudgetExceeded, "pack_corrupt": PackCorrupt,
          "model_closed": ModelClosed, "unsupported_model": UnsupportedModel,
          "config": ConfigError, "bad_request": ValueError}
_REMOTE = {code: type(f"Remote{t.__name__}", (RemoteError, t), {})
           for code, t in _LOCAL.items()}


def remote_error(code: str, message: str, rid: int | None = None) -> RemoteError:
    return _REMOTE.get(code, RemoteError)(code, message, rid)


class Client:
    def __init__(self, endpoint: str | None = None, timeout: float = TIMEOUT_S,
                 retries: int = RETRIES,
                 curve: tuple | None = None):
        """``endpoint``: where `edgert serve` listens (None: its default ipc endpoint).
        ``curve``: (server public key file, client secret key file) for a CURVE service."""
        if endpoint is None:
            from .endpoint import default_endpoint
            endpoint = default_endpoint()
        if not timeout > 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        self.endpoint, self.timeout, self.retries, self.curve = endpoint, timeout, retries, curve
        self._ctx = zmq.Context.instance()
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._pending: dict[int, _Pending] = {}     # request id -> its state
        self._gen = 0
        self._closed = False
        self._link = None
        self._link = _Link(self._ctx, endpoint, curve)

    # --- the ops ------------------------------------------------------------------------------
    def hello(self) -> dict:
        """Protocol and package versions, limits, and every model with its kind, tasks,
        inputs and outputs."""
        out = self._call("hello", {})
        if out.get("protocol") != PROTOCOL:
            raise ServiceUnavailable(f"{self.endpoint} speaks protocol {out.get('protocol')}; "
                                     f"this client speaks {PROTOCOL}")
        return out

    def health(self) -> dict:
        return self._call("health", {})

    def stats(self, model: str | None = None) -> dict:
        """The service and its runtime (every arena byte attributed), or one model's stats."""
        return self._call("stats", {"model": model})

    def switch(self, task: str, model: str | None = None) -> dict:
        return self._call("switch", {"task": task, "model": model})

    def infer(self, inputs: dict, task: str | None = None, model: str | None = None) -> dict:
        """Outputs of the active task, or of ``task`` (switched to first, atomically).
        The arrays are read-only views of the received frames (copy one to change it)."""
        return self._call("infer", {"inputs": inputs, "task": task, "model": model})

    def prewarm(self, tasks: list[str], model: str | None = None) -> dict:
        return self._call("prewarm", {"tasks": list(tasks), "model": model})

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0,
                 model: str | None = None, stream: bool = False, *, top_p: float = 1.0,
                 seed: int = 0):
        """Like ``MoeLM.generate``: text in -> text out, token ids in -> new ids out;
        ``stream=True`` returns a Stream of pieces (closing it early cancels the rest)."""
        as_text = isinstance(prompt, str)
        if not as_text:
            prompt = [int(t) for t in prompt]
        pieces = self._stream("generate", {
            "prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "seed": seed, "model": model})
        if stream:
            return pieces
        out = list(pieces)
        return "".join(out) if as_text else out

    def load(self, path, name: str | None = None, **options) -> dict:
        """Load a pack into the service. ``path`` is on the service's machine; a relative
        path is taken from this process's working directory."""
        return self._call("load", {"path": os.path.abspath(os.fspath(path)), "name": name,
                                   "options": options}, resend=False)

    def unload(self, name: str) -> dict:
        return self._call("unload", {"name": name}, resend=False)

    def reload(self, name: str, path=None) -> dict:
        """Load ``path`` (default: the same pack) beside the served model, then swap; a
        failed reload leaves the old model serving."""
        path = None if path is None else os.path.abspath(os.fspath(path))
        return self._call("reload", {"name": name, "path": path}, resend=False)

    def shutdown(self) -> dict:
        return self._call("shutdown", {}, resend=False)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._link is not None:
                self._link.close()
                self._link = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- requests -----------------------------------------------------------------------------
    def _call(self, op: str, args: dict, resend: bool = True):
        args = {k: v for k, v in args.items() if v is not None}
        rid = next(self._ids)
        frames = encode_request(rid, op, args)
        tries = self.retries + 1 if resend else 1
        begun, backoff, attempt = time.monotonic(), BACKOFF_S, 0
        try:
            while True:
                attempt += 1
                rep = self._wait(rid, op, begun) if self._send(rid, op, frames, begun) else None
                if rep is not None:
                    if not rep.ok:
                        raise remote_error(rep.code, rep.message, rid)
                    return rep.result
                self._reset()
                if attempt >= tries or self._deadline(rid, begun) - time.monotonic() <= backoff:
                    raise self._silent(op, attempt, resend)
                time.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX_S)
        finally:
            self._forget(rid)

    def _stream(self, op: str, args: dict) -> "Stream":
        """Send now; the pieces come from the returned Stream."""
        args = {k: v for k, v in args.items() if v is not None}
        rid = next(self._ids)
        frames = encode_request(rid, op, args)
        sent = self._send(rid, op, frames, time.monotonic())
        return Stream(self, rid, self._pieces(op, rid, frames, sent))

    def _pieces(self, op: str, rid: int, frames: list, sent: bool):
        done, got, tries, backoff = False, False, 1, BACKOFF_S
        begun = time.monotonic()                # each next() has a deadline of its own
        try:
            while True:
                rep = self._wait(rid, op, begun) if sent else None
                if rep is None:
                    if got:                             # resend only what has not begun
                        raise ServiceUnavailable(f"{op}: {self.endpoint} went silent "
                                                 f"mid-stream (nothing for {self.timeout} s)")
                    self._reset()
                    if tries > self.retries or \
                            self._deadline(rid, begun) - time.monotonic() <= backoff:
                        raise self._silent(op, tries, True)
                    time.sleep(backoff)
                    backoff = min(2 * backoff, BACKOFF_MAX_S)
                    tries += 1
                    sent = self._send(rid, op, frames, begun)
                    continue
                got = True
                if not rep.ok:
                    done = True
                    raise remote_error(rep.code, rep.message, rid)
                if not rep.more:
                    done = True
                    return
                yield from (rep.result if isinstance(rep.result, list) else [rep.result])
                begun = time.monotonic()
        finally:
            if not done:
                self._cancel(rid)
            self._forget(rid)

    def _deadline(self, rid: int, begun: float) -> float:
        """A call gives up timeout x (retries + 1) after it began or the service last spoke
        of it, whichever is later: a service that beats is at work, not silent."""
        p = self._pending.get(rid)
        return max(begun, p.spoke if p else 0.0) + self.timeout * (self.retries + 1)

    def _silent(self, op: str, tries: int, resend: bool) -> ServiceUnavailable:
        if not resend:
            return ServiceUnavailable(f"{op}: no reply from {self.endpoint} within "
                                      f"{self.timeout} s; it may or may not have been applied "
                                      "(not resent)")
        return ServiceUnavailable(f"{op}: no reply from {self.endpoint} after {tries} "
                                  f"tries of {self.timeout} s (is `edgert serve` running, "
                                  "and is this client's key allowed?)")

    def _cancel(self, rid: int) -> None:
        """Best effort: tell the service to stop work on ``rid``; the reply is not awaited."""
        with self._lock:
            p = self._pending.get(rid)
            if self._link is None or p is None or p.gen != self._gen:
                return
            try:
                self._link.sock.send_multipart(encode_request(next(self._ids), "cancel",
                                                              {"id": rid}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # --- the socket ---------------------------------------------------------------------------
    def _reset(self) -> None:
        """Lazy Pirate: drop the socket (and whatever it queued), open a fresh one."""
        with self._lock:
            if self._closed:
                raise EdgertError("this client is closed")
            if self._link is not None:
                self._link.close()
            self._gen += 1
            self._link = None
            self._link = _Link(self._ctx, self.endpoint, self.curve)

    def _live(self, op: str) -> "_Link":
        """The socket, once libzmq has not said that the service turned this client away."""
        if self._link is None:
            raise EdgertError("this client is closed")
        why = self._link.handshake_failure()
        if why is not None:
            self._reset()            # a later call tries afresh (the allow list may change)
            raise ServiceUnavailable(f"{op}: {why}")
        return self._link

    def _send(self, rid: int, op: str, frames: list, begun: float) -> bool:
        """Queue the request, never blocking; False when the socket takes nothing within
        ``timeout`` or the call's deadline. (libzmq drops a connection's queue when its
        handshake fails: a blocking send would then wait forever.)"""
        until = time.monotonic() + self.timeout
        while True:
            with self._lock:
                link = self._live(op)
                try:
                    link.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    left = min(until, self._deadline(rid, begun)) - time.monotonic()
                    if left <= 0:
                        return False
                    link.wait(zmq.POLLOUT, min(left, POLL_SLICE_S))
                    continue
                p = self._pending.setdefault(rid, _Pending())
                p.gen, p.sent, p.replies = self._gen, time.monotonic(), deque()
                return True

    def _forget(self, rid: int) -> None:
        with self._lock:
            self._pending.pop(rid, None)

    def _wait(self, rid: int, op: str, begun: float):
        """The next reply (a piece or the final one) for ``rid``; None after ``timeout``
        seconds of silence about it, at the call's deadline, or when its socket was reset."""
        while True:
            with self._lock:
                p = self._pending[rid]
                if not p.replies and p.gen == self._gen and self._link is not None:
                    self._drain(self._live(op))
                if p.replies:
                    return p.replies.popleft()
                if p.gen != self._gen or self._link is None:
                    return None
                left = min(max(p.sent, p.spoke) + self.timeout,
                           self._deadline(rid, begun)) - time.monotonic()
                if left <= 0:
                    return None
                self._link.wait(zmq.POLLIN, min(left, POLL_SLICE_S))

    def _drain(self, link: "_Link") -> None:
        now = time.monotonic()
        while link.sock.get(zmq.EVENTS) & zmq.POLLIN:
            frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                rep = decode_reply(frames)
            except ProtocolError:
                continue                       # not from an edgert service: ignore
            p = self._pending.get(rep.id)
            if p is None:
                continue                       # an answer nobody waits for (cancelled)
            p.spoke = now
            if not rep.beat:
                p.replies.append(rep)


@dataclass
class _Pending:
    """A request on its way, and what the service said of it."""
    gen: int = -1               # the socket generation it went on
    sent: float = 0.0           # when it was last sent
    spoke: float = 0.0          # when the service last spoke of it (a reply or a beat)
    replies: deque = field(default_factory=deque)      # replies not yet taken


class _Link:
    """One DEALER socket to the service, and libzmq's word on its handshakes (a socket
    monitor): a refused key is otherwise only silence."""

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: tuple | None):
        self.endpoint, self.curve = endpoint, curve is not None
        self._drops = 0                 # handshakes dropped since the last one succeeded
        try:
            self.sock = ctx.socket(zmq.DEALER)
            try:
                self._events = ctx.socket(zmq.PAIR)
            except zmq.ZMQError:
                self.sock.close(linger=0)
                raise
        except zmq.ZMQError as e:
            raise ServiceUnavailable(f"cannot open a socket for {endpoint}: {e}") from None
        # closes in the one safe order, also when the client is dropped unclosed
        self.close = weakref.finalize(self, _close_link, self.sock, self._events)
        self.sock.linger = self._events.linger = 0   # closing never waits
        # NOTE: unbounded inbound queue: a client reads what it asked for, and a stream read
        # slowly must not lose pieces (the service would drop them at its high-water mark)
        self.sock.rcvhwm = 0
        # NOTE: libzmq sends monitor events blocking, from its I/O thread: a full or vanished
        # reader stalls every socket of the context. Hence no bound here (only a peer that
        # keeps dropping handshakes adds events, about ten a second), and _close_link.
        self._events.rcvhwm = 0
        try:
            if curve is not None:
                from .auth import curve_client
                curve_client(self.sock, *curve)
            addr = f"inproc://edgert-client-monitor-{next(_MONITORS)}"
            self.sock.monitor(addr, HANDSHAKE_EVENTS)
            self._events.connect(addr)  # before connect(): no handshake goes unreported
            self.sock.connect(endpoint)
        except (zmq.ZMQError, ConfigError) as e:
            self.close()
            if isinstance(e, ConfigError):
                raise
            raise ServiceUnavailable(f"cannot connect to {endpoint}: {e}") from None
        self._poller = zmq.Poller()
        self._poller.register(self._events, zmq.POLLIN)

    def wait(self, flag: int, seconds: float) -> None:
        """Until the socket is ready for ``flag``, a handshake event, or ``seconds``."""
        self._poller.register(self.sock, flag)
        self._poller.poll(1e3 * seconds)

    def handshake_failure(self) -> str | None:
        """Why the service will not talk to this client, once libzmq has said so."""
        while self._events.get(zmq.EVENTS) & zmq.POLLIN:
            event, value = struct.unpack("=HI", self._events.recv_multipart(zmq.NOBLOCK)[0])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._drops = 0
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return (f"{self.endpoint} refused this client's key (ZAP status {value}): "
                        "its public key must be in the service's --allow-dir")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                why = ("CURVE on one side only"
                       if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                       else f"ZMTP protocol error {value:#x}")
                return f"the handshake with {self.endpoint} failed: {why}"
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._drops += 1
                if self._drops >= HANDSHAKE_DROPS:
                    hint = ("is the server public key the service's?" if self.curve else
                            "is it a ZeroMQ service without CURVE?")
                    return (f"the handshake with {self.endpoint} failed: the peer closed the "
                            f"connection {self._drops} times running ({os.strerror(value)}); "
                            + hint)
        return None


def _close_link(sock: zmq.Socket, events: zmq.Socket) -> None:
    """Stop the monitor before closing its reader (libzmq would block on a closed one)."""
    sock.monitor(None, 0)
    events.close(linger=0)
    sock.close(linger=0)


class Stream:
    """The pieces of a streamed reply, as they come. The request is sent already;
    ``close()`` (or dropping the stream, or leaving ``with``) before the end cancels the
    rest on the service."""

    def __init__(self, client: Client, rid: int, pieces):
        self._client, self._rid, self._pieces = client, rid, pieces
        self._started = False

    def __iter__(self):
        return self

    def __next__(self):
        self._started = True
        return next(self._pieces)

    def close(self) -> None:
        if not self._started:          # a generator never started runs no finally: cancel here
            self._started = True
            self._client._cancel(self._rid)
            self._client._forget(self._rid)
        self._pieces.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:       # noqa: BLE001  (the client may be gone at interpreter exit)
            pass
