"""Restores that never crash and never cascade (issue 13): one bad variable drops alone; Enums
and classes from cells, locks, events, queues, weak references and local modules come back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

from gpu_kernel.checkpoint import load_namespace, save_namespace
from tests.test_checkpoint import KEY, notebook

REPO = Path(__file__).resolve().parent.parent


def in_fresh_python(code: str, cwd: Path) -> dict:
    """Run ``code`` in a new interpreter (in ``cwd``); return the JSON it prints last."""
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_variable_that_fails_to_load_drops_alone_and_nothing_crashes(tmp_path: Path) -> None:
    from tests.ckpt_helpers import Bomb

    word = "shared-" * 3
    ns: dict[str, Any] = {"first": [word, {"k": word}], "bad": [word, Bomb()]}
    for i in range(50):  # later variables reuse objects the failing one reached first
        ns[f"v{i}"] = {"word": word, "i": i, "nested": [word, (i, word)]}
    save_namespace(ns, tmp_path / "ck", KEY)
    code = (
        "import json\n"
        "from gpu_kernel.checkpoint import load_namespace\n"
        f"ns, m = load_namespace({str(tmp_path / 'ck')!r}, {KEY!r})\n"
        "print(json.dumps({'names': sorted(ns), 'v49': ns['v49'],\n"
        "    'dropped': [[d.name, d.reason] for d in m.dropped]}))\n"
    )
    out = in_fresh_python(code, tmp_path)  # the old loader died here with a segfault
    assert out["names"] == sorted(n for n in ns if n != "bad")
    assert out["v49"] == {"word": word, "i": 49, "nested": [word, [49, word]]}
    [[name, reason]] = out["dropped"]
    assert name == "bad" and "this object refuses to come back" in reason


CELLS = """
import enum, dataclasses, typing
class Color(enum.Enum):
    RED = 1
    GREEN = 2
    CRIMSON = 1
    def pretty(self): return self.name.lower()
    @property
    def loud(self): return self.name + "!"
    @classmethod
    def default(cls): return cls.GREEN
class Perm(enum.IntFlag):
    R = 4
    W = 2
class Planet(enum.Enum):
    EARTH = (5.97e24, 6.37e6)
    def __init__(self, mass, radius):
        self.mass, self.radius = mass, radius
fav, rw, home = Color.GREEN, Perm.R | Perm.W, Planet.EARTH
@dataclasses.dataclass
class Config:
    n_layer: int = 2
    names: list = dataclasses.field(default_factory=list)
cfg = Config(3, ["a"])
class Pair(typing.NamedTuple):
    x: int
    y: int = 0
pair = Pair(1)
class Base:
    def __init__(self, n): self.n = n
    def twice(self): return 2 * self.n
class Child(Base):
    def __init__(self, n, extra):
        super().__init__(n)
        self.extra = extra
    def twice(self): return super().twice() + self.extra
kid = Child(3, 1)
"""


def test_enums_dataclasses_and_class_hierarchies_defined_in_cells(tmp_path: Path) -> None:
    ns = notebook(CELLS)
    saved = save_namespace(ns, tmp_path / "ck", KEY)
    out, loaded = load_namespace(tmp_path / "ck", KEY)
    assert not saved.dropped and not loaded.dropped
    Color = out["Color"]
    assert out["fav"] is Color.GREEN and Color.default() is Color.GREEN
    assert Color.CRIMSON is Color.RED and [c.name for c in Color] == ["RED", "GREEN"]
    assert out["fav"].pretty() == "green" and out["fav"].loud == "GREEN!"
    assert out["rw"] == 6 and out["rw"] & out["Perm"].W
    assert out["home"].mass == 5.97e24 and out["home"] is out["Planet"].EARTH
    assert out["cfg"] == out["Config"](3, ["a"]) and out["Config"]().names == []
    assert out["pair"] == (1, 0) and out["Pair"](2).y == 0
    assert isinstance(out["kid"], out["Base"]) and out["kid"].twice() == 7


def test_locks_events_conditions_and_queues_come_back_working(tmp_path: Path) -> None:
    import queue

    held = threading.Lock()
    held.acquire()
    q: queue.Queue = queue.Queue()
    q.put("job-1")
    q.put({"job": 2})
    event = threading.Event()
    event.set()
    box = notebook("class Box:\n    pass\nbox = Box()\n")
    box["box"].lock = threading.RLock()
    ns = box | {
        "lock": threading.Lock(),
        "held": held,
        "event": event,
        "cond": threading.Condition(),
        "sem": threading.Semaphore(2),
        "q": q,
    }
    saved = save_namespace(ns, tmp_path / "ck", KEY)
    out, loaded = load_namespace(tmp_path / "ck", KEY)
    assert not saved.dropped and not loaded.dropped
    assert out["lock"].acquire(timeout=1) and not out["lock"].acquire(blocking=False)
    assert out["held"].locked() and out["event"].is_set()
    with out["cond"]:
        out["cond"].notify_all()
    assert out["sem"].acquire(timeout=1) and out["sem"].acquire(timeout=1)
    assert out["q"].get(timeout=1) == "job-1" and out["q"].get(timeout=1) == {"job": 2}
    with out["box"].lock:
        pass


def test_weakrefs_come_back_alive_with_their_object_or_are_reported(tmp_path: Path) -> None:
    ns = notebook("class Node:\n    pass\nnode = Node()\nother = Node()\n")
    outside = ns["Node"]()  # alive now, but nothing in the namespace holds it
    gone = ns["Node"]()
    ns |= {
        "ref": weakref.ref(ns["node"]),
        "refs": {"a": weakref.ref(ns["node"])},
        "wset": weakref.WeakSet([ns["node"], ns["other"]]),
        "wvals": weakref.WeakValueDictionary({"n": ns["node"]}),
        "lonely": weakref.ref(outside),
        "dead": weakref.ref(gone),
    }
    del gone
    saved = save_namespace(ns, tmp_path / "ck", KEY)
    out, loaded = load_namespace(tmp_path / "ck", KEY)
    assert out["ref"]() is out["node"] and out["refs"]["a"]() is out["node"]
    assert set(out["wset"]) == {out["node"], out["other"]} and out["wvals"]["n"] is out["node"]
    assert out["dead"]() is None  # it was dead when saved
    names = {v.name for v in loaded.variables}
    assert "lonely" not in out and "lonely" not in names
    [lonely] = [d for d in loaded.dropped if d.name == "lonely"]
    assert "would come back dead" in lonely.reason
    assert "lonely" in {v.name for v in saved.variables}


def test_local_modules_cwd_and_sys_path_come_back_before_unpickling(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    (proj / "lib").mkdir(parents=True)
    (proj / "shapes.py").write_text(
        "class Square:\n"
        "    def __init__(self, s): self.s = s\n"
        "    def area(self): return self.s ** 2\n"
    )
    (proj / "lib" / "units.py").write_text("class Meter(float):\n    pass\n")
    (proj / "lib" / "heavy.py").write_text(
        "class Ton:\n    w = 1000\n" + "# padding\n" * 120_000
    )  # over 1 MiB: named, not copied
    code = (
        "import os, sys, json\n"
        "sys.path.insert(0, 'lib')\n"  # relative: only the working directory makes it work
        "sys.path.insert(0, '')\n"
        "import shapes, units, heavy\n"
        "from gpu_kernel.checkpoint import save_namespace\n"
        "ns = {'sq': shapes.Square(3), 'm': units.Meter(2.5), 'ton': heavy.Ton()}\n"
        "ns['shapes'] = shapes\n"
        f"m = save_namespace(ns, {str(tmp_path / 'ck')!r}, {KEY!r})\n"
        "print(json.dumps([d.name for d in m.dropped]))\n"
    )
    assert in_fresh_python(code, proj) == []
    load = (
        "import json, os\n"
        "from gpu_kernel.checkpoint import load_namespace\n"
        f"ns, m = load_namespace({str(tmp_path / 'ck')!r}, {KEY!r},\n"
        f"    modules_dir=__import__('pathlib').Path({str(tmp_path / 'mods')!r}))\n"
        "print(json.dumps({'cwd': os.getcwd(), 'area': ns['sq'].area() if 'sq' in ns else None,\n"
        "    'm': ns.get('m'), 'ton': 'ton' in ns, 'notes': m.notes,\n"
        "    'dropped': {d.name: d.reason for d in m.dropped}}))\n"
    )
    here = in_fresh_python(load, tmp_path)  # the files are still there: cwd and sys.path
    assert here["cwd"] == str(proj) and here["area"] == 9 and here["m"] == 2.5
    assert here["ton"] and not here["dropped"] and not here["notes"]

    proj.rename(tmp_path / "elsewhere")  # as on another host: the module files are not there
    there = in_fresh_python(load, tmp_path)
    assert there["area"] == 9 and there["m"] == 2.5  # from the copies saved with the checkpoint
    assert any("module shapes" in n and "using the copy" in n for n in there["notes"])
    assert not there["ton"]
    assert "proj/lib/heavy.py is not on this host" in there["dropped"]["(module heavy)"]
    assert "heavy.py is not on this host" in there["dropped"]["ton"]
    assert "does not exist here" in there["dropped"]["(working directory)"]


def test_sklearn_pipeline_matplotlib_figure_and_polars_frame(tmp_path: Path) -> None:
    """The issue's library objects (the test extras install all three)."""
    import matplotlib
    import numpy as np
    import polars as pl
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns: dict[str, Any] = {}
    X = np.random.default_rng(0).normal(size=(40, 3))
    ns["pipe"] = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, X[:, 0] > 0)
    ns["fig"], ns["ax"] = plt.subplots()
    ns["ax"].plot([1, 2, 3], [3, 1, 2], label="curve")
    ns["frame"] = pl.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    ns["X"] = X
    out, loaded = load_namespace(save_namespace(ns, tmp_path / "ck", KEY) and tmp_path / "ck", KEY)
    assert not loaded.dropped and set(out) == set(ns)
    assert (out["pipe"].predict(X) == ns["pipe"].predict(X)).all()
    assert out["ax"] in out["fig"].axes  # the axes are the figure's own, as before
    assert list(out["ax"].lines[0].get_ydata()) == [3, 1, 2]
    assert out["frame"].equals(ns["frame"])
