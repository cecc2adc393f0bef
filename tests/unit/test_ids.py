"""Message and request ids: their public shape, time order, and no repeats across a fork."""

from __future__ import annotations

import os
import re
import time
import uuid

from sendkit import ids


def test_a_message_id_is_32_hex_digits_that_sort_by_time() -> None:
    first = ids.message_id()
    time.sleep(0.002)
    second = ids.message_id()
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first < second
    assert int(first[:12], 16) <= time.time_ns() // 1_000_000


def test_a_request_id_is_a_uuid_version_7_that_sorts_by_time() -> None:
    first = ids.request_id()
    time.sleep(0.002)
    second = ids.request_id()
    parsed = uuid.UUID(first)
    assert str(parsed) == first
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert first < second


def test_ids_do_not_repeat() -> None:
    many = [ids.message_id() for _ in range(5000)] + [ids.request_id() for _ in range(5000)]
    assert len(set(many)) == len(many)


def test_a_forked_child_does_not_reuse_the_parents_random_bytes() -> None:
    ids.message_id()  # the pool now holds unread bytes the child would inherit
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.close(read)
        os.write(write, ids.message_id()[12:].encode())
        os._exit(0)
    os.close(write)
    child_tail = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child_tail != ids.message_id()[12:]
