"""Fleet server (edgert server)."""
