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

Threads: one lock serialises the socket, so a client may be shared, but its calls then
take turns. For parallel requests, use one client per thread.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque

import zmq

from ..errors import (BudgetExceeded, ConfigError, EdgertError, InputMismatch, ModelClosed,
                      PackCorrupt, UnknownTask, UnsupportedModel)
from .protocol import PROTOCOL, ProtocolError, decode_reply, encode_request

BACKOFF_S = 0.1          # first wait before a resend, doubled each time
BACKOFF_MAX_S = 2.0
POLL_SLICE_S = 0.05      # a waiting thread lets go of the socket this often


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
    def __init__(self, endpoint: str | None = None, timeout: float = 5.0, retries: int = 3,
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
        self._box: dict[int, deque] = {}        # request id -> replies not yet taken
        self._heard: dict[int, float] = {}      # request id -> when the service last spoke of it
        self._sent_on: dict[int, int] = {}      # request id -> the socket generation it went on
        self._gen = 0
        self._closed = False
        self._sock = None
        self._sock = self._open_socket()

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
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- requests -----------------------------------------------------------------------------
    def _call(self, op: str, args: dict, resend: bool = True):
        args = {k: v for k, v in args.items() if v is not None}
        rid = next(self._ids)
        frames = encode_request(rid, op, args)
        backoff = BACKOFF_S
        tries = self.retries + 1 if resend else 1
        try:
            for attempt in range(tries):
                self._send(rid, frames)
                rep = self._wait(rid)
                if rep is not None:
                    if not rep.ok:
                        raise remote_error(rep.code, rep.message, rid)
                    return rep.result
                self._reset()
                if attempt + 1 < tries:
                    time.sleep(backoff)
                    backoff = min(2 * backoff, BACKOFF_MAX_S)
        finally:
            self._forget(rid)
        raise self._silent(op, tries, resend)

    def _stream(self, op: str, args: dict) -> "Stream":
        """Send now; the pieces come from the returned Stream."""
        args = {k: v for k, v in args.items() if v is not None}
        rid = next(self._ids)
        frames = encode_request(rid, op, args)
        self._send(rid, frames)
        return Stream(self, rid, self._pieces(op, rid, frames))

    def _pieces(self, op: str, rid: int, frames: list):
        done, got, tries, backoff = False, False, 1, BACKOFF_S
        try:
            while True:
                rep = self._wait(rid)
                if rep is None:
                    if got or tries > self.retries:     # resend only what has not begun
                        raise self._silent(op, tries, True)
                    self._reset()
                    time.sleep(backoff)
                    backoff = min(2 * backoff, BACKOFF_MAX_S)
                    tries += 1
                    self._send(rid, frames)
                    continue
                got = True
                if not rep.ok:
                    done = True
                    raise remote_error(rep.code, rep.message, rid)
                if not rep.more:
                    done = True
                    return
                yield from (rep.result if isinstance(rep.result, list) else [rep.result])
        finally:
            if not done:
                self._cancel(rid)
            self._forget(rid)

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
            if self._sock is None or self._sent_on.get(rid) != self._gen:
                return
            try:
                self._sock.send_multipart(encode_request(next(self._ids), "cancel",
                                                         {"id": rid}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # --- the socket ---------------------------------------------------------------------------
    def _open_socket(self):
        s = self._ctx.socket(zmq.DEALER)
        s.linger = 0
        # NOTE: unbounded inbound queue: a client reads what it asked for, and a stream read
        # slowly must not lose pieces (the service would drop them at its high-water mark)
        s.rcvhwm = 0
        try:
            if self.curve is not None:
                from .auth import curve_client
                curve_client(s, *self.curve)
            s.connect(self.endpoint)
        except (zmq.ZMQError, ConfigError) as e:
            s.close(linger=0)
            if isinstance(e, ConfigError):
                raise
            raise ServiceUnavailable(f"cannot connect to {self.endpoint}: {e}") from None
        return s

    def _reset(self) -> None:
        """Lazy Pirate: drop the socket (and whatever it queued), open a fresh one."""
        with self._lock:
            if self._closed:
                raise EdgertError("this client is closed")
            if self._sock is not None:
                self._sock.close(linger=0)
            self._gen += 1
            self._sock = None
            self._sock = self._open_socket()

    def _send(self, rid: int, frames: list) -> None:
        with self._lock:
            if self._sock is None:
                raise EdgertError("this client is closed")
            self._box[rid] = deque()
            self._heard[rid] = time.monotonic()
            self._sent_on[rid] = self._gen
            self._sock.send_multipart(frames, copy=False)

    def _forget(self, rid: int) -> None:
        with self._lock:
            self._box.pop(rid, None)
            self._heard.pop(rid, None)
            self._sent_on.pop(rid, None)

    def _wait(self, rid: int):
        """The next reply (a piece or the final one) for ``rid``; None after ``timeout``
        seconds of silence about it, or when its socket was reset."""
        while True:
            with self._lock:
                box = self._box[rid]
                if box:
                    return box.popleft()
                if self._sent_on.get(rid) != self._gen or self._sock is None:
                    return None
                left = self._heard[rid] + self.timeout - time.monotonic()
                if left <= 0:
                    return None
                if self._sock.poll(1e3 * min(left, POLL_SLICE_S)):
                    self._drain()

    def _drain(self) -> None:
        now = time.monotonic()
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                rep = decode_reply(frames)
            except ProtocolError:
                continue                       # not from an edgert service: ignore
            box = self._box.get(rep.id)
            if box is None:
                continue                       # an answer nobody waits for (cancelled)
            self._heard[rep.id] = now
            if not rep.beat:
                box.append(rep)


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
