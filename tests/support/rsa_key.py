"""RSA keys for the DKIM and ARC tests and the edge bench, made by `openssl` (the format dkimpy and
`[policy] arc_key` read): the private key in traditional PEM, and the public half as a DKIM record's p=."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path


def new_rsa_key(pem: Path, bits: int) -> str:
    """Writes a new `bits`-bit RSA key to `pem`; returns its public half (base64 of the DER) for p=."""
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(pem), str(bits)], check=True, capture_output=True)
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(pem), "-pubout", "-outform", "DER"], check=True, capture_output=True
    ).stdout
    return base64.b64encode(der).decode()
