"""Every curl example of the API document, run verbatim with curl against `sendkit serve`.

Only the base URL, the token and the appId are changed, as the README promises; the
DELETE example's URL is quoted, since an unquoted `&` ends the command in a shell.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.live import LiveServer, live_server

DOC = Path(__file__).resolve().parents[2] / "docs" / "sendkit-api.txt"


def curl_examples() -> list[str]:
    blocks = re.findall(r"^(curl .*?)(?:\n\s*\n|\Z)", DOC.read_text(), flags=re.S | re.M)
    assert len(blocks) == 4, "the document has four curl examples"
    return blocks


def adapt(example: str, server: LiveServer, token: str, app_id: str) -> str:
    command = example.replace("https://api.sendkit.best", server.base_url)
    command = command.replace("<token>", token)
    command = command.replace('"appId": "1234567890"', f'"appId": "{app_id}"')
    command = command.replace("appId=1234567890", f"appId={app_id}")
    # The one change a shell needs: quote the DELETE URL so `&` stays inside it.
    return re.sub(r"(-X DELETE )(\S+)", r"\1'\2'", command)


def run_curl(command: str) -> dict[str, Any]:
    done = subprocess.run(
        ["bash", "-c", command + " --silent --show-error"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_documented_curl_examples_verbatim(tmp_path: Path, database_url: str) -> None:
    with live_server(tmp_path, database_url) as server:
        demo = server.cli("init", "--demo")
        # Eight calls in quick succession: above the documented 5 per second.
        server.cli("account", "set-plan", demo["accountId"], "--rate", "50")
        send, get_list, save, delete = (
            adapt(e, server, demo["apiKey"], demo["appId"]) for e in curl_examples()
        )
        assert "Bearer <token>" not in send and server.base_url in send

        sent = run_curl(send)
        assert sent["code"] == 0 and sent["success"] is True and sent["data"] is None
        assert sent["message"] == "Successfully"

        assert run_curl(get_list)["data"] == {"total": 0, "page": 1, "pageSize": 50, "list": []}
        assert run_curl(save)["code"] == 0

        listed = run_curl(get_list)["data"]
        assert listed["total"] == 1 and listed["pageSize"] == 50
        assert listed["list"] == [
            {
                "emailAddress": "john.doe@example.com",
                "status": "Confirmed",
                "language": "en",
                "firstName": "John",
                "lastName": "Doe",
                "phoneNumber": "1234567890",
                "birthday": "1990-01-01",
                "company": "Example Inc.",
                "vipLevel": 1,
                "amount": "100.00",
            }
        ]
        assert run_curl(delete)["code"] == 0
        assert run_curl(get_list)["data"]["total"] == 0
        again = run_curl(delete)
        assert again["code"] == 100033 and "not found" in again["message"]
