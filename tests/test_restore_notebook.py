"""A harder notebook suspended on one sshd host and resumed on the other (issue 13).

A small GPT-2-like model built from a config (tied weights, AdamW after a step), an object
graph like an sklearn pipeline's, a class hierarchy, an Enum defined in a cell, a class from a
local ``.py`` module (whose file is gone when the kernel comes back, as on a host that lacks
it), a lock and a weakref: every name comes back, with equal values. (sklearn, matplotlib and
polars objects round-trip in ``test_checkpoint_restore``, in-process: importing them in two
kernels takes most of a minute on a small machine.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager

from broker.client import BrokerClient
from tests.pool import Pool
from tests.sshd import ClientKeys, TestHost
from tests.test_suspend_resume import last_line, run, started, wait_suspended

MODULE = """
class Scaler:
    def __init__(self, k):
        self.k = k
    def __call__(self, x):
        return x * self.k
"""

CELLS = r"""
import os, sys, json, enum, threading, weakref, dataclasses
import torch
from torch import nn
os.chdir(WORK)
sys.path.insert(0, "")
from mylocal import Scaler

@dataclasses.dataclass
class GPTConfig:
    vocab: int = 64
    block: int = 16
    n_embd: int = 32
    n_head: int = 4
    n_layer: int = 2

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = nn.MultiheadAttention(cfg.n_embd, cfg.n_head, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))
    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)
        self.head.weight = self.wte.weight  # tied
    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(x)

torch.manual_seed(0)
cfg = GPTConfig()
model = GPT(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
idx = torch.randint(0, cfg.vocab, (2, cfg.block))
loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
loss.backward(); opt.step()

class Phase(enum.Enum):
    WARMUP = "warmup"
    TRAIN = "train"
    def next(self): return Phase.TRAIN
phase = Phase.WARMUP

class Animal:
    def __init__(self, name): self.name = name
    def speak(self): return "..."
class Dog(Animal):
    def speak(self): return self.name + ": woof"
pets = [Dog("rex"), Animal("cat")]

scale = Scaler(3)
lock = threading.Lock()
ref = weakref.ref(pets[0])
history = {"loss": [float(loss)], "phase": phase}

X = torch.randn(40, 3).numpy()  # estimators holding arrays and each other, sklearn-like
pipe = {"steps": [("scale", {"mean": X.mean(0)}), ("clf", {"coef": X[:3].copy()})]}
pipe["final"] = pipe["steps"][-1][1]
"""

FINGERPRINT = r"""
def _fp():
    import numpy as np
    keys = sorted(k for k in globals() if not k.startswith("_")
                  and k not in ("In", "Out", "exit", "quit", "get_ipython"))
    with torch.no_grad():
        out = model(idx).sum().item()
    d = {"keys": keys, "model": round(out, 4),
         "tied": model.head.weight is model.wte.weight,
         "opt": all(p in opt.state for p in model.parameters()),
         "phase": [phase.value, phase.next().value, phase is Phase.WARMUP],
         "pets": [p.speak() for p in pets], "dog": isinstance(pets[0], Animal),
         "scale": scale(2), "ref": ref() is pets[0],
         "lock": lock.acquire(blocking=False) and (lock.release() or True),
         "history": [history["loss"], history["phase"] is phase],
         "cwd": os.getcwd() == WORK}
    d["pipe"] = [float(pipe["steps"][0][1]["mean"].sum()), pipe["final"] is pipe["steps"][1][1]]
    return d
print(json.dumps(_fp(), sort_keys=True))
"""


@pytest.fixture
def slow_exit_pool(
    tmp_path: Path, ssh_hosts: list[TestHost], client_keys: ClientKeys, monkeypatch
) -> Iterator[Pool]:
    """A pool that never suspends for idleness (the test suspends with ``%gpu suspend``), whose
    leases outlive a kernel that takes seconds to exit: one holding torch does on a busy
    2-core machine, and the provisioner sends no heartbeat while it waits for that exit."""
    pool = Pool(tmp_path / "pool", ssh_hosts, client_keys, heartbeat_timeout="60s")
    pool.start()
    pool.install_spec()
    monkeypatch.setenv("SHARED_GPU_TOKEN", pool.user_token)
    yield pool
    pool.close()


def test_a_hard_notebook_resumes_on_another_host_with_every_name(
    slow_exit_pool: Pool, tmp_path: Path
) -> None:
    for km, kc in started(slow_exit_pool):
        resume_elsewhere(slow_exit_pool, km, kc, tmp_path)


def resume_elsewhere(
    idle_pool: Pool, km: KernelManager, kc: BlockingKernelClient, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "mylocal.py").write_text(MODULE)
    content, _ = run(kc, f"WORK = {str(work)!r}\n" + CELLS, timeout=120)
    assert content["status"] == "ok", content
    before = json.loads(last_line(run(kc, FINGERPRINT)[1]))
    assert before["tied"] and before["ref"] and before["scale"] == 6
    first_host = last_line(run(kc, "print(os.environ['SHARED_GPU_HOST'])")[1])

    assert run(kc, "%gpu suspend")[0]["status"] == "ok"
    wait_suspended(idle_pool, km.kernel_id)
    (work / "mylocal.py").unlink()  # as on a host without the notebook's module
    other = BrokerClient(idle_pool.url, idle_pool.token("someone-else"))
    taken = other.request_lease("sim", "other-kernel")  # the kernel must move
    assert taken.host.name == first_host

    sent = time.monotonic()
    content, printed = run(kc, FINGERPRINT, timeout=120)
    took = time.monotonic() - sent
    assert content["status"] == "ok", content
    assert "Resumed on" in printed and "not restored" not in printed, printed
    after = json.loads(last_line(printed))
    assert after == before  # every name back, every value equal
    assert last_line(run(kc, "print(os.environ['SHARED_GPU_HOST'])")[1]) != first_host
    print(f"resume with {len(after['keys'])} names on the other host: {took:.1f} s")
    other.release(taken.id)
