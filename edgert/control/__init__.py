"""ZeroMQ control plane (edgert serve, edgert.Client)."""
