"""Inbound SMTP: the sans-IO protocol (protocol.py), strict RFC 5321 paths (address.py), the Received
header (received.py) and the asyncio server with its limits, TLS and graceful stop (server.py)."""
