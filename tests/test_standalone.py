"""The standalone app (``python -m dreambooth ui``): ``--auth`` protects the page and the REST routes; ``--allow``
adds read roots and ``--allow-write`` write roots.  Issue 12 item 14 (and 13 for the app's roots)."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.gradio


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def launched(tmp_path):
    """``launched(**options)``: the app on a free port of 127.0.0.1, closed after the test; returns (url, tab)."""
    from dreambooth.ui.standalone import launch

    started = []

    def start(**options):
        port = _free_port()
        blocks, tab, _ = launch(tmp_path / "models", port=port, block=False, **options)
        started.append(blocks)
        return f"http://127.0.0.1:{port}", tab

    yield start
    for blocks in started:
        blocks.close(verbose=False)


def test_auth_protects_the_page_and_the_rest_routes(launched):
    import httpx

    url, _ = launched(auth="alice:secret,bob:pw")
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        assert client.get("/config").status_code == 401  # gradio's login guards the page's data
        assert client.post("/login", data={"username": "alice", "password": "wrong"}).status_code == 400
        assert client.get("/dreambooth/status").status_code == 401
        assert client.get("/dreambooth/status", auth=("alice", "wrong")).status_code == 401
        response = client.get("/dreambooth/status", auth=("bob", "pw"))
        assert response.status_code == 200 and response.json()["state"] == "idle"
        assert client.post("/login", data={"username": "alice", "password": "secret"}).status_code == 200
        assert client.get("/config").status_code == 200


def test_without_auth_the_app_is_open_on_this_machine_only(launched):
    import httpx

    url, _ = launched()
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        assert client.get("/config").status_code == 200
        assert client.get("/dreambooth/status").status_code == 200


def test_a_malformed_auth_does_not_start_an_open_app(tmp_path):
    from dreambooth.errors import DreamBoothError
    from dreambooth.ui.standalone import launch

    with pytest.raises(DreamBoothError, match="user:password"):
        launch(tmp_path / "models", port=_free_port(), block=False, auth="alice")


def test_allow_adds_read_roots_and_allow_write_adds_write_roots(launched, tmp_path):
    from dreambooth.cli import build_parser

    args = build_parser().parse_args(["ui", "--allow", "A", "--allow-write", "B", "--auth", "u:p"])
    assert (args.allow, args.allow_write, args.auth) == (["A"], ["B"], "u:p")
    _, tab = launched(allowed_roots=[str(tmp_path / "data")], write_roots=[str(tmp_path / "class")])
    policy = tab.host.paths
    assert policy.may_read(tmp_path / "data" / "set") and not policy.may_write(tmp_path / "data" / "set")
    assert policy.may_write(tmp_path / "class") and policy.may_write(tab.host.checkpoint_dir / "x.safetensors")
    assert tab.host.lora_dir == tmp_path / "models" / "Lora" and tab.host.lora_dir.is_dir()  # made at start
    assert policy.may_write(tab.host.lora_dir / "x.safetensors")
    assert policy.may_read(tab.host.models_dir)  # the defaults stay: --allow adds
