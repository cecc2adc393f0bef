"""`sendkit domain records` and `sendkit messages show` against a real database."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import dkim as dkimpy
import httpx
from typer.testing import CliRunner

from sendkit.cli import app
from tests.live import live_server


def cli(runner: CliRunner, env: dict[str, str], data_dir: Path, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir), "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_domain_records_and_message_show(tmp_path: Path, database_url: str) -> None:
    with live_server(tmp_path, database_url, SENDKIT_POLL_INTERVAL="0.05") as server:
        runner = CliRunner()
        env = server.env
        demo = cli(runner, env, server.data_dir, "init", "--demo")
        result = runner.invoke(
            app,
            [
                "domain",
                "add",
                "mail.acme.test",
                "--account",
                demo["accountId"],
                "--verified",
                "--data-dir",
                str(server.data_dir),
            ],
            env=env,
        )
        assert result.exit_code == 0, result.output
        records = cli(
            runner,
            env,
            server.data_dir,
            "domain",
            "records",
            "mail.acme.test",
            "--account",
            demo["accountId"],
        )["records"]
        by_purpose = {r["purpose"]: r for r in records}
        assert set(by_purpose) >= {"SPF", "DKIM", "DMARC", "Return-Path"}
        assert by_purpose["DKIM"]["name"] == "sendkit._domainkey.mail.acme.test"
        assert by_purpose["DKIM"]["value"].startswith("v=DKIM1; k=rsa; p=")
        assert by_purpose["DMARC"]["name"] == "_dmarc.mail.acme.test"
        assert by_purpose["Return-Path"]["name"] == "bounces.mail.acme.test"
        printed = json.dumps(records)
        assert "PRIVATE KEY" not in printed

        response = httpx.post(
            f"{server.base_url}/v1/send",
            headers={"Authorization": f"Bearer {demo['apiKey']}"},
            json={
                "from": "Acme <from@example.com>",
                "to": "to@example.com",
                "subject": "test send",
                "body": "test content",
            },
        )
        message_id = response.headers["x-message-id"]
        shown: dict[str, Any] = {}
        for _ in range(100):
            shown = cli(runner, env, server.data_dir, "messages", "show", message_id)
            if shown["status"] == "delivered":
                break
            asyncio.run(asyncio.sleep(0.1))
        assert shown["status"] == "delivered"
        assert shown["attempts"][0]["code"] == 250
        raw = shown["raw"].encode()
        assert b"Subject: test send" in raw
        by_request = cli(runner, env, server.data_dir, "messages", "show", shown["request_id"])
        assert by_request["id"] == message_id

        demo_records = cli(
            runner,
            env,
            server.data_dir,
            "domain",
            "records",
            "example.com",
            "--account",
            demo["accountId"],
        )["records"]
        dkim_txt = next(r["value"] for r in demo_records if r["purpose"] == "DKIM")
        signed = raw.split(b"\r\n", 1)[1] if raw.startswith(b"Return-Path") else raw
        signed = signed.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
        assert dkimpy.verify(signed, dnsfunc=lambda name, timeout=5: dkim_txt.encode())
        logs = server.logs()
        assert "PRIVATE KEY" not in logs
        assert demo["apiKey"] not in logs
