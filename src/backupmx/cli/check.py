"""`backupmx check DOMAIN`: argparse wiring around the audit in `backupmx.audit`, which does the work.

Exit status: 0 when no mark is a fail (warnings allowed; `--strict` makes warnings fail too), 1 when
at least one is, 2 for usage errors (bad domain, nameserver, port or config file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from typing import Any

from backupmx.audit import parse_nameserver, render_json, render_text, run_check
from backupmx.cli.exits import EXIT_USAGE
from backupmx.config import load_config

__all__ = ["add_parser", "check_command"]


def add_parser(subparsers: Any) -> None:
    """Registers `check` on the CLI's subparsers (`argparse._SubParsersAction`)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help="audit a domain's MX setup: MX and NS records, same-site risks, SMTP (sends no mail)",
        description='Audit DOMAIN\'s mail exchangers from here: MX/NS records and addresses, "same building" '
        "risks, and per MX address an SMTP session (banner, EHLO, STARTTLS and certificate, postmaster, "
        "an unknown user, a foreign domain; RSET and QUIT, never DATA); MTA-STS policy, DANE TLSA, TLS-RPT, "
        "and with --asn-db/--asn-lookup the origin AS of every MX address. Exit 0: no fail; 1: a fail "
        "(or, with --strict, a warning); 2: usage error. docs/check.md explains every mark.",
    )
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")
    p.add_argument(
        "--nameserver",
        metavar="IP[:PORT]",
        help="resolve through this server (default: [dns] nameservers of --config, else the system resolver)",
    )
    p.add_argument("--config", "-c", metavar="FILE", help="also check this node's view (server.hostname, [[domains]])")
    p.add_argument("--port", type=_port, default=25, metavar="N", help="SMTP port on every MX address (default 25)")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="bound on each DNS lookup and each SMTP step (default 10)",
    )
    p.add_argument("--cafile", metavar="FILE", help="trust only these CA certificates (default: the system's)")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument(
        "--asn-db",
        metavar="FILE",
        help="origin AS and prefix of every MX address from this IP-to-AS "
        'file (pyasn\'s IPASN format: "prefix/len<TAB>ASN" lines): same AS warns, same prefix fails',
    )
    p.add_argument(
        "--asn-lookup",
        choices=["dns"],
        help="instead ask origin.asn.cymru.com over DNS (which then "
        'learns the MX addresses); without this or --asn-db the network check says "not checked"',
    )
    # test-only: where https://mta-sts.DOMAIN/ listens when the test lab may not bind 443 (not root)
    p.add_argument("--sts-port", type=_port, default=443, help=argparse.SUPPRESS)
    p.set_defaults(handler=check_command)


def check_command(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else None  # ConfigError: the CLI prints it, exit 2
    if args.nameserver:
        try:
            parse_nameserver(args.nameserver)
        except ValueError as e:
            print(f"backupmx check: --nameserver {e}", file=sys.stderr)
            return EXIT_USAGE
    if args.cafile and not os.path.isfile(args.cafile):
        print(f"backupmx check: --cafile {args.cafile}: no such file", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = asyncio.run(
            run_check(
                args.domain,
                nameserver=args.nameserver,
                config=config,
                smtp_port=args.port,
                timeout=args.timeout,
                cafile=args.cafile,
                asn_db=args.asn_db,
                asn_lookup=args.asn_lookup,
                sts_port=args.sts_port,
            )
        )
    except (ValueError, ssl.SSLError) as e:  # a bad domain or --asn-db, or a --cafile without a certificate
        print(f"backupmx check: {e}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(render_json(report) if args.json else render_text(report))
    return report.strict_exit_code if args.strict else report.exit_code


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 600 seconds")
    return value
