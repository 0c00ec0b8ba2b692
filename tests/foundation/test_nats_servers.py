"""``NATS_URL`` with several servers and credentials (shared.broker.NatsServers), and
``NEPHROTRACK_STREAM_REPLICAS``: parsed without a server; the broker and a plain client then
connect past a dead first server to the machine's NATS."""

from __future__ import annotations

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.broker import NatsServers, NatsUrlError, make_broker, nats_connect_options
from shared.settings import RuntimeSettings
from tests.conftest import NATS_URL, free_port


def test_one_server_with_credentials_gives_them_to_the_client_not_the_url() -> None:
    parsed = NatsServers.parse("nats://labs:s3cret@nats-1:4222")
    assert parsed == NatsServers(("nats://nats-1:4222",), "labs", "s3cret")
    assert parsed.connect_options() == {"servers": ["nats://nats-1:4222"], "user": "labs", "password": "s3cret"}


def test_credentials_on_the_first_server_authenticate_at_every_server() -> None:
    parsed = NatsServers.parse("nats://labs:pw@nats-1:4222, nats://nats-2:4222,nats-3:4222")
    assert parsed.servers == ("nats://nats-1:4222", "nats://nats-2:4222", "nats://nats-3:4222")
    assert (parsed.user, parsed.password) == ("labs", "pw")


def test_the_same_credentials_may_be_repeated_but_not_differ() -> None:
    assert NatsServers.parse("nats://a:pw@h1:4222,nats://a:pw@h2:4222").user == "a"
    with pytest.raises(NatsUrlError, match="same credentials"):
        NatsServers.parse("nats://a:pw@h1:4222,nats://b:pw@h2:4222")


def test_a_token_and_no_credentials() -> None:
    assert NatsServers.parse("nats://tok@h:4222").connect_options() == {"servers": ["nats://h:4222"], "token": "tok"}
    assert NatsServers.parse("nats://h:4222").connect_options() == {"servers": ["nats://h:4222"]}
    with pytest.raises(NatsUrlError, match="no server"):
        NatsServers.parse(" , ")


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30))
def test_a_percent_encoded_password_arrives_decoded(password: str) -> None:
    from urllib.parse import quote

    url = f"nats://outcomes:{quote(password, safe='')}@127.0.0.1:4222,nats://127.0.0.1:4223"
    assert nats_connect_options(url, name="x") == {
        "servers": ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"], "user": "outcomes", "password": password,
        "name": "x",
    }


def test_stream_replicas_default_to_one_and_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEPHROTRACK_STREAM_REPLICAS", raising=False)
    assert RuntimeSettings().stream_replicas == 1
    monkeypatch.setenv("NEPHROTRACK_STREAM_REPLICAS", "3")
    assert RuntimeSettings().stream_replicas == 3
    monkeypatch.setenv("NEPHROTRACK_STREAM_REPLICAS", "0")
    with pytest.raises(ValidationError):
        RuntimeSettings()


async def test_clients_reach_the_second_server_when_the_first_is_down() -> None:
    """A dead first server in the list: the FastStream broker and a plain client connect to the next."""
    urls = f"nats://127.0.0.1:{free_port()},{NATS_URL}"
    broker = make_broker(urls, name="test-two-servers")
    await broker.connect()
    try:
        assert broker.connection.is_connected
        assert broker.connection.connected_url.port == int(NATS_URL.rsplit(":", 1)[1])
    finally:
        await broker.stop()
    client = await nats.connect(**nats_connect_options(urls, connect_timeout=2))
    try:
        assert client.is_connected
    finally:
        await client.close()
