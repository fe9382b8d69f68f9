"""The README's kcat example: the file it writes, published as kcat publishes a file (the whole file
as one message, under the key it gives), is a request Conduit sends.

kcat itself cannot be run here: Debian 12's kcat (librdkafka 2.0.2) fails to read the embedded
Tansu broker's ApiVersions reply, which the last test records so that a fixed broker is noticed.
"""
from __future__ import annotations

import asyncio
import re
import shlex
import shutil
from pathlib import Path

import pytest

from conduit.peers.smtp import CaptureSmtpServer
from shared.kafka import Publisher
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import StatusReader, dispatch_running, sending_mailbox
from tests.support.waiting import eventually

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> tuple[str, str, str, bytes]:
    """(topic, key, file name, file content) of the README's `kcat -P` example, read as bash would."""
    text = README.read_text()
    section = text[text.index("## Publishing an outbound email from any system"):]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)
    heredoc = re.search(r"cat > (\S+) <<'JSON'\n(.*?\n)JSON\n", block, re.DOTALL)
    produce = shlex.split(next(line for line in block.splitlines() if line.startswith("kcat -P")))
    topic, key, file = produce[produce.index("-t") + 1], produce[produce.index("-k") + 1], produce[-1]
    assert file == heredoc.group(1), "kcat must publish the file the example writes"
    return topic, key, file, heredoc.group(2).encode()


async def test_the_readme_example_is_sent_once(settings: Settings, registry: Registry, org, publisher: Publisher,
                                               tmp_path) -> None:
    topic, key, _, content = readme_example()
    placeholder = b"<organization id from `conduit org show`>"
    assert topic == "email.outbound" and placeholder in content and b"ann@example.com" in content
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        value = content.replace(placeholder, str(org.id).encode()).replace(b"ann@example.com", sender.email.encode())
        async with dispatch_running(settings), StatusReader(settings) as statuses:
            await publisher.publish_many([(topic, value, key)])

            async def final():
                await statuses.poll()
                return statuses.final(key)
            assert (await eventually(final)).status == "sent"
            assert statuses.statuses(key) == ["pending_send", "sending", "sent"]
        (message,) = capture.messages()
        assert message.header("Subject").startswith("Your invoice") and message.header("To") == "bea@customer.example"


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by scripts/install-peers.sh")
async def test_debian_kcat_cannot_talk_to_the_embedded_broker(settings: Settings) -> None:
    """What the README says: when this fails, kcat works against the embedded broker, and the
    README's note and this module's first test can run kcat itself."""
    kcat = await asyncio.create_subprocess_exec("kcat", "-L", "-b", settings.kafka_bootstrap_servers, "-m", "3",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await kcat.communicate()
    assert kcat.returncode != 0 and b"ApiVersionRequest failed" in err, err.decode()
