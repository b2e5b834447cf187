"""Messages for the emergency inbox tests, as stored bytes (CRLF): plain text, HTML, multipart with an
attachment and an inline image, Korean in legacy charsets, and a hostile HTML message that tries every
way we know to run script or reach the network."""

from __future__ import annotations

import base64
from email.message import EmailMessage
from email.policy import SMTP

# A 1x1 red PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


def _head(sender: str, to: str, subject: str, date: str) -> EmailMessage:
    m = EmailMessage(policy=SMTP)
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Date"] = date
    m["Message-ID"] = f"<{abs(hash((sender, to, subject, date)))}@sender.test>"
    return m


def plain(
    to: str = "alice@example.test",
    subject: str = "Plain hello",
    *,
    sender: str = "Bob <bob@else.test>",
    text: str = "Hello Alice,\n\nthe quarterly figures are attached to nothing: this is plain text.\n",
    date: str = "Tue, 24 Nov 2026 09:15:00 +0000",
) -> bytes:
    m = _head(sender, to, subject, date)
    m.set_content(text)
    return m.as_bytes()


def html(
    to: str = "alice@example.test",
    subject: str = "Newsletter in HTML",
    *,
    sender: str = "News <news@else.test>",
    date: str = "Tue, 24 Nov 2026 10:00:00 +0000",
) -> bytes:
    m = _head(sender, to, subject, date)
    m.set_content("The plain text version of the newsletter.\n")
    m.add_alternative(
        '<html><body><h1 style="color:#0b57d0">This week</h1>'
        '<p>Three things happened. <b>One</b>, <i>two</i> and <a href="https://example.org/more">three</a>.</p>'
        '<table border="1" cellpadding="4"><tr><th>Item</th><th>Count</th></tr>'
        "<tr><td>Apples</td><td>3</td></tr></table></body></html>",
        subtype="html",
    )
    return m.as_bytes()


def multipart(
    to: str = "alice@example.test",
    subject: str = "Contract and logo",
    *,
    sender: str = "Carol <carol@else.test>",
    date: str = "Tue, 24 Nov 2026 11:30:00 +0000",
) -> bytes:
    m = _head(sender, to, subject, date)
    m.set_content("Please find the contract attached.\n")
    m.add_alternative(
        '<p>Please find the contract attached.</p><p><img src="cid:logo@else.test" alt="logo" '
        'width="16" height="16"></p>',
        subtype="html",
    )
    html_part = m.get_payload()[1]
    html_part.add_related(PNG, maintype="image", subtype="png", cid="<logo@else.test>")
    m.add_attachment(
        b"%PDF-1.4\n% a tiny contract\n", maintype="application", subtype="pdf", filename="contract 2026.pdf"
    )
    m.add_attachment("계약서 요약입니다.\n".encode(), maintype="text", subtype="plain", filename="요약.txt")
    return m.as_bytes()


def korean(to: str = "alice@example.test", *, charset: str = "ks_c_5601-1987") -> bytes:
    """What Outlook in Korea sends: the body in ks_c_5601-1987 (really cp949), a B-encoded subject."""
    subject = "=?ks_c_5601-1987?B?" + base64.b64encode("회의 일정 안내".encode("cp949")).decode() + "?="
    body = "안녕하세요. 다음 주 회의는 화요일 오후 2시입니다.\r\n".encode("cp949")
    return (
        f"From: =?UTF-8?B?{base64.b64encode('김철수'.encode()).decode()}?= <kim@else.test>\r\n"
        f"To: {to}\r\nSubject: {subject}\r\nDate: Tue, 24 Nov 2026 12:00:00 +0900\r\n"
        f'MIME-Version: 1.0\r\nContent-Type: text/plain; charset="{charset}"\r\n'
        f"Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + body


def hostile(origin: str, to: str = "alice@example.test") -> bytes:
    """HTML that tries scripts, handlers, javascript: links, CSS expressions and url(), remote images of
    every kind, a form, frames, objects, meta refresh and <base>; `origin` is a recording server."""
    markup = f"""<html><head>
<meta http-equiv="refresh" content="0;url={origin}/meta-refresh">
<base href="{origin}/base/">
<link rel="stylesheet" href="{origin}/link.css">
<style>@import url("{origin}/import.css"); body {{ background: url("{origin}/style-bg.png") }}</style>
<script>alert("script-in-head"); fetch("{origin}/fetch-head");</script>
</head>
<body onload="alert('onload')" background="{origin}/body-background.png">
<h1 id="hostile-title">Totally normal invoice</h1>
<script>alert("script-in-body"); new Image().src = "{origin}/script-image";</script>
<img src="{origin}/remote.png" alt="remote image" onerror="alert('onerror')">
<img src="x" onerror="alert('onerror-x'); fetch('{origin}/onerror-fetch')">
<img srcset="{origin}/srcset.png 1x" alt="srcset">
<img src="relative.png" alt="relative">
<picture><source srcset="{origin}/picture.png"><img alt="picture"></picture>
<svg width="10" height="10"><image href="{origin}/svg-image.png" width="10" height="10"/>
  <script>alert("svg-script")</script></svg>
<div style="width: expression(alert('css-expression')); background-image: url('{origin}/css-url.png')">css</div>
<p style="behavior: url({origin}/behavior.htc); color: red">red text</p>
<a id="js-link" href="javascript:alert('javascript-link')">click me</a>
<a id="js-link-encoded" href="jav&#x09;ascript:alert('encoded-link')">encoded</a>
<a id="data-link" href="data:text/html,&lt;script&gt;alert('data-link')&lt;/script&gt;">data link</a>
<form id="phish" action="{origin}/form" method="post"><input name="password" type="password" value="hunter2">
  <button id="phish-submit" type="submit">Log in to read</button></form>
<iframe src="{origin}/iframe"></iframe>
<object data="{origin}/object.swf"></object><embed src="{origin}/embed.swf">
<video poster="{origin}/poster.png" src="{origin}/video.mp4" autoplay></video>
<audio src="{origin}/audio.mp3" autoplay></audio>
<table background="{origin}/table-bg.png"><tr><td background="{origin}/td-bg.png">cell</td></tr></table>
<math><mtext><table><mglyph><style><img src="{origin}/mxss.png" onerror="alert('mxss')">
</style></mglyph></table></mtext></math>
<details open ontoggle="alert('ontoggle')"><summary>more</summary>x</details>
<input autofocus onfocus="alert('autofocus')">
</body></html>"""
    m = _head(
        "\"<script>alert('from')</script>\" <evil@else.test>",
        to,
        "<img src=x onerror=alert('subject')> Invoice",
        "Tue, 24 Nov 2026 13:00:00 +0000",
    )
    m.set_content("plain version of the hostile message\n")
    m.add_alternative(markup, subtype="html")
    m.add_attachment(
        f"<script>alert('attachment')</script><img src=\"{origin}/attachment.png\">".encode(),
        maintype="text",
        subtype="html",
        filename='"><img src=x onerror=alert(1)>.html',
    )
    return m.as_bytes()
