"""ZeroMQ control plane: the device service (`edgert serve`) and its client (edgert.Client).

protocol.py is the wire format (docs/protocol.md); service.py the ROUTER loop and its
workers; ops.py what each op checks and does; client.py the Lazy Pirate client; auth.py
CurveZMQ keys; endpoint.py where the service listens.
"""
from .client import Client, RemoteError, ServiceUnavailable
from .protocol import PROTOCOL, ProtocolError

__all__ = ["Client", "RemoteError", "ServiceUnavailable", "ProtocolError", "PROTOCOL"]
