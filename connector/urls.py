"""URLs the connector sends credentials to, and URLs it prints.

Rules (checked when the config is read, so `connector validate` reports them with file and line):

- an http(s) URL has a host and nothing before it: `https://user:password@host/` is refused, because
  credentials belong in the auth settings (by reference), and because `http://127.0.0.1:x@api.example.org/`
  is a URL to api.example.org that only looks local;
- a URL that carries credentials (a token, a password, a signed assertion) is `https://`, or plain
  `http://` to this machine only (127.0.0.0/8, ::1, localhost), where nothing crosses a network.

URLs are parsed as the HTTP client parses them (httpx), and a URL that another parser reads differently
(urllib) is refused rather than guessed at. Messages name the host, never a user name or a password.
A database URL is printed with its password masked (`masked`), and `scrub` removes it from any text (a
driver's error message) before that text is printed.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from connector.references import Unresolved

Origin = tuple[str, str, int]
_DEFAULT_PORTS = {"http": 80, "https": 443}
LOCAL_ONLY = "plain http:// only to 127.0.0.1, ::1 or localhost"


def parse_http_url(value: str) -> httpx.URL:
    """An absolute http(s) URL with a host and no user info; ValueError (not quoting the URL) otherwise."""
    if any(ch.isspace() or ord(ch) < 32 or ch == "\\" for ch in value):
        raise ValueError("the URL holds spaces, control characters or a backslash")
    try:
        url = httpx.URL(value)
        split = urlsplit(value)
    except (httpx.InvalidURL, ValueError):
        raise ValueError("not a valid URL") from None
    if url.scheme not in _DEFAULT_PORTS or not url.host:
        raise ValueError("expected an http(s) URL with a host, such as https://ehr.example.org/fhir/r4")
    if "@" in split.netloc or url.userinfo:
        raise ValueError(
            "a URL may not hold a user name or password (the part before '@'); give credentials "
            "in their own settings, by reference"
        )
    if (split.hostname or "") != url.host:
        raise ValueError("the host of this URL is ambiguous; write it plainly, such as https://ehr.example.org")
    return url


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`: addresses that never leave this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(value: str, *, credentials: bool) -> str:
    """`value` if it passes the rules above (with `credentials`: https, or http to loopback). A value whose
    `${VAR}` is not set is left for the command that needs it to report."""
    if isinstance(value, Unresolved):
        return value
    url = parse_http_url(value)
    if credentials and url.scheme == "http" and not is_loopback(url.host):
        raise ValueError(f"credentials would cross the network in clear to {url.host}: use https:// ({LOCAL_ONLY})")
    return value


def origin(url: httpx.URL | str) -> Origin:
    """(scheme, host, port) with the default port filled in: two URLs may share credentials only if equal."""
    url = httpx.URL(url) if isinstance(url, str) else url
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 0)


def show_origin(url: httpx.URL | str) -> str:
    """`scheme://host:port` of a URL: what messages print, never its path, query or user info."""
    scheme, host, port = origin(url)
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def masked(database_url: str) -> str:
    """A database URL as it may be printed: the password (in the user info or a `password=` parameter)
    replaced with ***."""
    try:
        url = make_url(database_url)
    except (ArgumentError, ValueError):
        return "<a ledger URL that cannot be parsed>"
    if "password" in url.query:
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=True).replace("password=%2A%2A%2A", "password=***")


def scrub(text: str, database_url: str) -> str:
    """`text` without the password of `database_url` (as written and URL-encoded) in it."""
    for secret in _passwords(database_url):
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            text = text.replace(form, "***")
    return text


def _passwords(database_url: str) -> list[str]:
    found: list[str] = []
    try:
        url = make_url(database_url)
    except (ArgumentError, ValueError):
        netloc = urlsplit(database_url).netloc.rpartition("@")[0]
        found.append(netloc.partition(":")[2])
    else:
        found.append(str(url.password or ""))
        query_password = url.query.get("password")
        found += [query_password] if isinstance(query_password, str) else list(query_password or ())
    found += [value for name, value in parse_qsl(urlsplit(database_url).query) if name == "password"]
    return [secret for secret in found if secret]
