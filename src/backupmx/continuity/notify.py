"""Sending a sign-in link to someone's *alternate* address (`access grant ADDR --notify OTHER`) through
the configured smarthost (`[continuity] smarthost`), never through a protected primary: the primary is
what is down, and an address of a protected domain would only come back to us. The notice is in Korean
and English (we do not know the reader's language yet). Errors: NotifyError, with the SMTP reason."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import aiosmtplib

from backupmx.config import Config, parse_hostport
from backupmx.errors import BackupMXError

TIMEOUT_SECONDS = 30.0


class NotifyError(BackupMXError):
    pass


def check_notify_target(config: Config, to: str) -> str:
    """The alternate address, refused when it is of a protected domain or no smarthost is configured."""
    to = to.strip()
    if to.count("@") != 1 or to.startswith("@") or to.endswith("@") or any(c in to for c in " <>\r\n,;"):
        raise NotifyError(f"--notify {to!r}: not an address such as alice@elsewhere.example")
    domain = to.rpartition("@")[2].lower()
    if domain in config.domain_names:
        raise NotifyError(
            f"--notify {to}: {domain} is a protected domain; its mail is what is held. "
            "Give an address elsewhere (a personal mailbox, a colleague's)"
        )
    if not config.continuity.smarthost:
        raise NotifyError('--notify needs [continuity] smarthost = "host:port" (a relay that is not the primary)')
    return to


def link_notice(config: Config, *, to: str, address: str, link: str, link_expires_at: float) -> EmailMessage:
    sender = config.continuity.notify_from or f"postmaster@{config.server.hostname}"
    until = datetime.fromtimestamp(link_expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    domain = address.rpartition("@")[2]
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"[{domain}] 장애 중 보관된 메일 읽기 / Read your held mail"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=config.server.hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        f"{domain} 메일 서비스 장애 중에 {address} 앞으로 온 메일은 백업 서버에 안전하게 보관되어 있습니다.\n"
        f"아래 링크를 열면 보관 중인 메일을 읽을 수 있습니다. 링크는 한 번만 사용할 수 있으며 {until}까지 유효합니다.\n"
        "서비스가 복구되면 모든 메일이 평소 메일함으로도 전달됩니다. 비밀번호는 필요하지 않습니다.\n\n"
        f"{link}\n\n"
        f"While the mail service of {domain} is down, the mail sent to {address} is kept safely on a backup\n"
        f"server. Open the link above to read it. It works once, until {until}. Every message will also\n"
        "arrive in the normal mailbox when the service is back. No password is needed.\n"
    )
    return msg


async def send_notice(config: Config, msg: EmailMessage) -> None:
    smarthost = config.continuity.smarthost
    if not smarthost:
        raise NotifyError("no [continuity] smarthost")
    host, port = parse_hostport(smarthost, default_port=25)
    sender = str(msg["From"])
    try:
        await aiosmtplib.send(
            msg,
            sender=sender,
            recipients=[str(msg["To"])],
            hostname=host,
            port=port,
            local_hostname=config.server.hostname,
            timeout=TIMEOUT_SECONDS,
        )
    except aiosmtplib.SMTPResponseException as e:
        raise NotifyError(f"smarthost {smarthost} refused the notice: {e.code} {e.message}") from None
    except (aiosmtplib.SMTPException, OSError) as e:
        raise NotifyError(f"smarthost {smarthost}: {e}") from None
