"""The API contract: docs/openapi.yaml lists every route of the tornado app with its methods, real
replies validate against its schemas (jsonschema), and hostile input (hypothesis) never gets a
500 and never changes state when it is rejected."""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from broker.http.app import make_app
from tests.test_broker_admin import Env

SPEC = yaml.safe_load((Path(__file__).parent.parent / "docs" / "openapi.yaml").read_text())
METHODS = ("get", "post", "delete", "put", "patch")


def template_regex(template: str) -> re.Pattern[str]:
    return re.compile(
        "^"
        + re.sub(r"\{[^}]+\}", "[^?]+", re.escape(template).replace(r"\{", "{").replace(r"\}", "}"))
        + "$"
    )


TEMPLATES = {tpl: template_regex(tpl) for tpl in SPEC["paths"]}


def spec_path(path: str) -> str | None:
    """The spec's template for a concrete path (the most specific one)."""
    path = urllib.parse.urlsplit(path).path
    hits = [tpl for tpl, rx in TEMPLATES.items() if rx.match(path)]
    return max(hits, key=lambda t: t.count("/") - t.count("{"), default=None)


def response_schema(
    template: str, method: str, status: int, ctype: str = "application/json"
) -> dict | None:
    responses = SPEC["paths"][template][method]["responses"]
    resp = responses.get(str(status))
    assert resp is not None, f"{method.upper()} {template}: status {status} is not in the spec"
    if "$ref" in resp:
        resp = SPEC["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
    content = resp.get("content", {})
    assert ctype in content, f"{method.upper()} {template} {status}: {ctype} not in the spec"
    return content[ctype].get("schema")


def validate(template: str, method: str, status: int, body: Any, ctype: str) -> None:
    schema = response_schema(template, method, status, ctype)
    if schema is None:
        return
    Draft202012Validator({"components": SPEC["components"], **schema}).validate(body)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    e.start()
    yield e
    e.stop()


def request(
    env: Env, method: str, path: str, body: bytes | None = None, token: str | None = "ana"
) -> tuple[int, str, bytes]:
    parts = urllib.parse.urlsplit(env.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {env.tokens.get(token, token)}"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def call(env: Env, method: str, path: str, body: Any = None, who: str = "ana") -> tuple[int, Any]:
    """One request; its reply is validated against the spec and returned."""
    raw = json.dumps(body).encode() if body is not None else None
    status, ctype, data = request(env, method, path, raw, who)
    template = spec_path(path)
    assert template is not None, f"{path} is not in the spec"
    parsed = json.loads(data) if ctype.startswith("application/json") else data.decode()
    validate(template, method.lower(), status, parsed, ctype.split(";")[0])
    return status, parsed


def test_every_route_is_in_the_spec(env: Env) -> None:
    assert env.server is not None and env.server.service is not None
    app = make_app(env.server.service)
    seen = set()
    for rule in app.wildcard_router.rules:
        regex = rule.matcher.regex.pattern.rstrip("$")
        alternatives = re.findall(r"\(([a-z|]+)\)", regex) or [""]
        for word in alternatives[0].split("|"):
            concrete = re.sub(r"\(([a-z|]+)\)", word, regex)
            concrete = re.sub(r"\([^)]*\)", "x", concrete).replace("\\", "")
            template = spec_path(concrete)
            assert template is not None, f"route {regex} ({concrete}) is not in docs/openapi.yaml"
            seen.add(template)
            handler = rule.target
            methods = {
                m
                for m in METHODS
                if m.upper() in handler.SUPPORTED_METHODS
                and getattr(handler, m) is not getattr(tornado_base(), m)
            }
            assert methods == set(SPEC["paths"][template]) - {"parameters"}, template
    assert seen == set(SPEC["paths"]), set(SPEC["paths"]) - seen


def tornado_base() -> type:
    import tornado.web

    return tornado.web.RequestHandler


def test_real_replies_match_the_spec(env: Env) -> None:
    st_, lease = call(env, "POST", "/api/v1/leases", {"kind": "a100", "kernel_id": "k1"})
    assert st_ == 201
    lid = lease["id"]
    assert call(env, "POST", "/api/v1/leases", {"kind": "a100", "kernel_id": "k2"}, "ben")[0] == 201
    assert (
        call(env, "POST", "/api/v1/leases", {"kind": "a100", "kernel_id": "k3"}, "carl")[0] == 202
    )
    assert call(env, "POST", "/api/v1/leases", {"kind": "h100", "kernel_id": "k"})[0] == 400
    assert call(env, "GET", f"/api/v1/leases/{lid}?wait=0.01")[0] == 200
    assert call(env, "GET", f"/api/v1/leases/{lid}", who="ben")[0] == 403
    assert call(env, "GET", "/api/v1/leases/nope")[0] == 404
    assert call(env, "POST", f"/api/v1/leases/{lid}/heartbeat", {"busy": True})[0] == 200
    for who in ("ana", "prof", "root"):
        assert call(env, "GET", "/api/v1/status", who=who)[0] == 200
        assert call(env, "GET", "/api/v1/whoami", who=who)[0] == 200
        assert call(env, "GET", "/api/v1/usage?since=7d", who=who)[0] == 200
        assert call(env, "GET", "/api/v1/checkpoints", who=who)[0] == 200
    assert call(env, "GET", "/api/v1/usage?format=csv", who="root")[0] == 200
    assert call(env, "GET", "/api/v1/usage?since=yesterday")[0] == 400
    assert call(env, "GET", "/metrics", who="root")[0] == 200
    assert call(env, "GET", "/metrics")[0] == 403
    ckpt = {"host": "gpu1", "path": "/c", "bytes": 10}
    assert (
        call(env, "DELETE", f"/api/v1/leases/{lid}", {"reason": "suspended", "checkpoint": ckpt})[0]
        == 200
    )
    assert call(env, "GET", "/api/v1/checkpoints?kernel_id=k1")[1]["checkpoints"][0]["bytes"] == 10
    assert call(env, "DELETE", "/api/v1/checkpoints/k1")[0] == 200
    assert call(env, "DELETE", "/api/v1/checkpoints/k1")[0] == 404
    assert call(env, "POST", "/api/v1/hosts/gpu1/drain", who="root")[0] == 200
    assert call(env, "POST", "/api/v1/hosts/gpu1/undrain", who="root")[0] == 200
    assert call(env, "POST", "/api/v1/hosts/nope/drain", who="root")[0] == 404
    assert call(env, "POST", "/api/v1/hosts/gpu1/drain")[0] == 403
    assert call(env, "POST", "/api/v1/slots/gpu1/0/reset", who="root")[0] == 200
    assert call(env, "POST", "/api/v1/slots/nope/reset", who="root")[0] == 404
    assert call(env, "POST", "/api/v1/admin/reload", who="root")[0] == 200
    env.path.write_text("[server]\nport = 'x'\n")
    status, body = call(env, "POST", "/api/v1/admin/reload", who="root")
    assert status == 400 and body["error"]["issues"]
    assert call(env, "GET", "/api/v1/status", who="nobody-token")[0] == 401


# -- fuzzing ---------------------------------------------------------------------------------

SEGMENTS = st.one_of(
    st.sampled_from(["..", "%2e%2e", "gpu1", "gpu1/0", "nope", "", "%00", "a" * 300, "🙂"]),
    st.text(max_size=40),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
FIELDS = [
    "kind",
    "kernel_id",
    "busy",
    "last_activity",
    "reason",
    "checkpoint",
    "resume_from",
    "host",
    "path",
    "bytes",
]
BODIES = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.sampled_from([b"{", b"[]", b"null", b'"x"', b"1e999", b'{"kind": NaN}', b"\xff\xfe"]),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5).map(
        lambda v: json.dumps(v).encode()
    ),
    st.builds(
        lambda n: json.dumps({"kind": "a" * n, "kernel_id": "🙂" * n}).encode(),
        st.integers(0, 20_000),
    ),
)
TOKENS = st.one_of(
    st.sampled_from(
        [
            "ana",
            "ben",
            "prof",
            "root",
            None,
            "",
            "sgpu_",
            "sgpu_" + "A" * 43,
            "Basic abc",
            "x" * 5000,
        ]
    ),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60),
)
QUERIES = st.sampled_from(
    [
        "",
        "?wait=-1",
        "?wait=nan",
        "?wait=1e309",
        "?wait=0.01",
        "?kernel_id=k1",
        "?since=-5",
        "?since=abc",
        "?format=xml",
        "?group=physics",
        "?group=chem&format=csv",
        "?since=1e400",
    ]
)


def snapshot(env: Env) -> Any:
    assert env.server is not None
    service = env.server.service
    assert service is not None

    def take() -> Any:
        leases = tuple(
            (
                lease.id,
                lease.state,
                lease.slot_id,
                lease.last_heartbeat,
                lease.busy,
                lease.last_activity,
            )
            for lease in service.scheduler.leases()
        )
        states = tuple(service.slot_state(slot.id) for slot in service.scheduler.slots())
        store = service.store
        return (
            leases,
            states,
            tuple(store.checkpoints()),
            tuple(store.fences()),
            tuple(sorted(store.drained_hosts().items())),
            len(store.tokens()),
            tuple(service.config.slots),
        )

    return env.server.call(take)


def test_fuzz_never_500_and_rejections_change_nothing(env: Env) -> None:
    lease_ids = [env.client("ana").request_lease("a100", "k1").id]
    lease_ids.append(env.client("ben").request_lease("mig", "k2").id)
    templates = list(SPEC["paths"])

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]),
        template=st.sampled_from([*templates, "/api/v1/{x}", "/{x}", "/api/v1/leases/{x}/{x}"]),
        segment=st.one_of(st.sampled_from(lease_ids), SEGMENTS),
        quote=st.booleans(),
        query=QUERIES,
        body=BODIES,
        token=TOKENS,
    )
    def one(method, template, segment, quote, query, body, token) -> None:
        seg = urllib.parse.quote(segment, safe="" if quote else "/.%")
        path = re.sub(r"\{[^}]+\}", lambda _: seg, template) + query
        if not path.startswith("/"):
            path = "/" + path
        before = snapshot(env)
        status, _ctype, data = request(env, method, path, body, token)
        assert status < 500, (method, path, body, data[:300])
        if status >= 400:
            error = json.loads(data)
            Draft202012Validator(
                {"components": SPEC["components"], "$ref": "#/components/schemas/Error"}
            ).validate(error)
            assert snapshot(env) == before, (method, path, body, status)

    one()
