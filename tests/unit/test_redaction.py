"""Secrets in URLs shown on the system page are found by parsing the URL as redis-py does, not by pattern."""

from __future__ import annotations

import pytest
from redis.connection import parse_url

from controller.web.present import REDACTED, redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@h:1/0", f"redis://user:{REDACTED}@h:1/0"),
        ("redis://:p@ss@redis.internal:6379/0", f"redis://:{REDACTED}@redis.internal:6379/0"),
        ("rediss://admin:a@b:c@h/2", f"rediss://admin:{REDACTED}@h/2"),
        ("redis://h/0?password=hunter2", f"redis://h/0?password={REDACTED}"),
        (
            "redis://h/0?db=1&Password=x%26y&ssl_cert_reqs=none",
            f"redis://h/0?db=1&Password={REDACTED}&ssl_cert_reqs=none",
        ),
        ("unix:///run/redis.sock?password=pw&db=3", f"unix:///run/redis.sock?password={REDACTED}&db=3"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("not a url: pw@host", "not a url: pw@host"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact({"store": {"redis_url": url}}) == {"store": {"redis_url": shown}}


@pytest.mark.parametrize(
    "url",
    [
        "redis://:p@ss@h:6379/0",
        "redis://u:a:b@c@h/1",
        "redis://h/0?password=s3cr%40t",
        "rediss://u:pw@h/0?password=two",
        "unix:///run/redis.sock?password=pw",
    ],
)
def test_nothing_redis_would_use_as_a_password_is_shown(url: str) -> None:
    password = parse_url(url)["password"]
    assert password and password not in str(redact({"redis_url": url}))
