"""The provisioner's choice of credential: a broker token, or (``token_source = "jupyterhub"``)
the Jupyter server's own hub API token, which goes to the broker and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.client import BrokerClient, read_token
from broker.config.loader import load_config
from broker.daemon import BrokerServer
from broker.errors import BrokerAuthError, BrokerError
from provisioner.install import main as install_main
from provisioner.settings import ProvisionerSettings, SettingsError

HUB_TOKEN = "0123456789abcdef0123456789abcdef"


def test_the_kernelspec_chooses_the_hub_token_and_says_so(tmp_path: Path) -> None:
    args = ["install", "--prefix", str(tmp_path), "--broker-url", "http://127.0.0.1:1"]
    assert install_main([*args, "--jupyterhub"]) == 0
    spec = (tmp_path / "share/jupyter/kernels/shared-gpu/kernel.json").read_text()
    settings = ProvisionerSettings.from_config(
        json.loads(spec)["metadata"]["kernel_provisioner"]["config"]
    )
    assert settings.token_source == "jupyterhub"
    with pytest.raises(SettingsError, match="token_source must be"):
        ProvisionerSettings.from_config({"broker_url": "http://b:1", "token_source": "hub"})


def test_the_hub_token_is_read_from_the_servers_environment_only(monkeypatch) -> None:
    monkeypatch.setenv("SHARED_GPU_TOKEN", "sgpu_not_this_one")
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    with pytest.raises(BrokerError) as info:
        read_token(source="jupyterhub")
    assert "does not run under JupyterHub" in str(info.value)
    assert "--jupyterhub" in str(info.value)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", HUB_TOKEN)
    assert read_token(source="jupyterhub") == (HUB_TOKEN, "$JUPYTERHUB_API_TOKEN")
    assert read_token()[0] == "sgpu_not_this_one"  # the default stays the broker token


def test_a_refused_hub_token_is_never_shown_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        '[[hosts]]\nname = "local"\naddress = "local"\n'
        '  [[hosts.slots]]\n  kind = "sim"\n  count = 1\n  simulated = true\n'
    )
    server = BrokerServer(load_config(path), port=0, tick_interval=0.05)
    url = server.start_in_thread()
    try:
        client = BrokerClient(url, HUB_TOKEN, token_source="$JUPYTERHUB_API_TOKEN")
        with pytest.raises(BrokerAuthError) as info:
            client.whoami()
        text = str(info.value)
        assert "$JUPYTERHUB_API_TOKEN" in text and "[identity] jupyterhub" in text
        assert HUB_TOKEN not in text
        client.close()
    finally:
        server.stop_thread()
    assert HUB_TOKEN not in (tmp_path / "broker.sqlite").read_bytes().decode("latin-1")
