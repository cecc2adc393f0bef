"""Pure parts of events and deliverability: the address check, the SMTP reply map,
unsubscribe tokens, event type lists."""

from __future__ import annotations

import ipaddress

import pytest

from sendkit import errors, netguard, unsubscribe, webhooks
from sendkit.crypto import SecretBox
from sendkit.smtpd.replies import LOCAL_ERROR, reply_for


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),  # AWS metadata over IPv6
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:93.184.216.34", True),
    ],
)
def test_only_global_addresses_are_reachable(address: str, allowed: bool) -> None:
    assert netguard.is_allowed(ipaddress.ip_address(address)) is allowed


def test_allow_list_opens_a_range() -> None:
    allow = netguard.parse_networks("127.0.0.0/8, ::1/128")
    assert netguard.is_allowed(ipaddress.ip_address("127.0.0.1"), allow)
    assert netguard.is_allowed(ipaddress.ip_address("::ffff:127.0.0.2"), allow)
    assert not netguard.is_allowed(ipaddress.ip_address("10.0.0.1"), allow)
    with pytest.raises(ValueError):
        netguard.parse_networks("not-a-network")


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (errors.InvalidSignature(), "535 5.7.8 "),
        (errors.AccountNotActivated(), "550 5.7.1 "),
        (errors.SubscriptionExpired(), "550 5.7.1 "),
        (errors.RateLimited(), "452 4.5.3 "),
        (errors.DailyLimitReached(), "452 4.5.3 "),
        (errors.MessageTooLarge(), "552 5.3.4 "),
        (errors.InvalidDomain(), "553 5.7.1 "),
        (errors.UnknownSender(), "553 5.7.1 "),
        (errors.BadRequest("Bad request parameters: 'subject' is required"), "550 5.6.0 "),
        (errors.NotFound(), "550 5.6.0 "),
        (errors.ServiceUnavailable(), "451 4.3.0 "),
    ],
)
def test_smtp_reply_map(error: errors.SendKitError, reply: str) -> None:
    assert reply_for(error).startswith(reply)


def test_smtp_replies_are_one_line() -> None:
    assert reply_for(errors.BadRequest("a\r\n250 ok")) == "550 5.6.0 a 250 ok"
    assert reply_for(errors.SendKitError()) == LOCAL_ERROR


def test_unsubscribe_tokens_are_short_lowercase_and_keyed() -> None:
    box = SecretBox("k1")
    token = unsubscribe.make_token(box, "acct", "app", 123456789)
    assert token == token.lower()
    assert len("unsubscribe+" + token) <= 64  # fits a local part
    assert token != unsubscribe.make_token(SecretBox("k2"), "acct", "app", 123456789)
    assert token != unsubscribe.make_token(box, "other", "app", 123456789)
    assert token != unsubscribe.make_token(box, "acct", "other", 123456789)
    assert unsubscribe.token_from_local_part("Unsubscribe+" + token.upper()) == token


def test_event_selection() -> None:
    assert webhooks.CreateWebhook(url="https://x.example", events="*").events == "*"
    chosen = webhooks.CreateWebhook(url="https://x.example", events=["bounced", "queued"])
    assert chosen.events == "queued,bounced"  # canonical order, no duplicates
    with pytest.raises(ValueError, match="unknown event type"):
        webhooks.CreateWebhook(url="https://x.example", events="opened")
