"""The broker config: examples load, each bad input is reported on its line, durations parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config.durations import format_duration, parse_duration
from broker.config.loader import ClassSession, Config, SlotConfig, load_config, parse_config
from broker.config.toml_check import LineIndex
from broker.errors import ConfigError, ConfigIssue

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

GOOD = """\
[server]
listen = "127.0.0.1:9000"

[policy]
heartbeat_interval = "10s"
heartbeat_timeout = "1m"

[[hosts]]
name = "gpu1"
address = "gpu1.example.org"
fence_user = "gpufence"
fence_key_file = "/etc/gpu-broker/fence_ed25519"

  [[hosts.slots]]
  kind = "a100"
  device = "0"

[[hosts]]
name = "gpu2"
address = "local"

  [[hosts.slots]]
  kind = "sim"
  device = "0"
  simulated = true

  [[hosts.slots]]
  kind = "a100"
  device = "1"
"""


def issues_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "lab.toml")
    return info.value.issues


def only_issue(text: str) -> ConfigIssue:
    issues = issues_of(text)
    assert len(issues) == 1, issues
    return issues[0]


def line_of(text: str, needle: str, nth: int = 0) -> int:
    """1-based line of the nth line containing needle, so tests do not hard-code numbers."""
    found = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return found[nth]


# --- examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.toml")))
def test_each_example_loads(name: str) -> None:
    config = load_config(EXAMPLES / f"{name}.toml")
    assert isinstance(config, Config) and config.hosts and config.slots
    assert config.server.database.parent == EXAMPLES or config.server.database.is_absolute()


def test_examples_have_the_promised_shape() -> None:
    lab = load_config(EXAMPLES / "lab-one-host.toml")
    assert [s.device for s in lab.slots] == ["0", "1"] and not lab.hosts[0].is_local
    mig = load_config(EXAMPLES / "multi-host-mig.toml")
    assert len(mig.hosts) == 3
    kinds = {s.kind for s in mig.slots if s.device.startswith("MIG-")}
    assert kinds == {"mig-1g.10gb"}
    assert {s.kind for s in mig.slots if not s.device.startswith("MIG-")} == {"a100"}
    local = load_config(EXAMPLES / "local-simulated.toml")
    assert local.hosts[0].is_local and local.hosts[0].known_hosts is None
    assert [(s.id, s.kind, s.device, s.simulated) for s in local.slots] == [
        ("local/0", "sim", "0", True),
        ("local/1", "sim", "1", True),
    ]


def test_the_jupyterhub_example_binds_its_class_to_hub_groups() -> None:
    hub = load_config(EXAMPLES / "jupyterhub-class.toml")
    assert hub.identity.jupyterhub is not None
    assert hub.identity.jupyterhub.api_url == "http://127.0.0.1:8081/hub/api"
    [group] = hub.groups
    assert (group.hub_group, group.teacher_hub_group) == ("ml-101", "ml-101-staff")
    assert hub.policy.members_only


def test_examples_cover_the_three_promised_set_ups() -> None:
    names = {p.stem for p in EXAMPLES.glob("*.toml")}
    assert {"lab-one-host", "multi-host-mig", "classroom", "local-simulated"} <= names
    room = load_config(EXAMPLES / "classroom.toml")
    [group] = room.groups
    assert group.kinds == ("mig-1g.10gb",) and group.max_slots_per_user == 1
    assert group.gpu_hours_per_day == 2.0 and group.priority == 10
    assert group.teachers == {"prof.lee"} and "ana" in group.members
    [session] = group.sessions
    assert session == ClassSession(frozenset({0, 2}), 9 * 60, 11 * 60, 5)
    assert room.groups_of("ana") == (group,) and room.groups_of("zoe") == ()
    assert room.host("gpu-research").auto_gpus and room.host("gpu-research").slots == ()
    assert room.policy.checkpoint_dir == "/shared/gpu-checkpoints"


# --- a good config ----------------------------------------------------------------------------


def test_good_config_values_and_lookups(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "broker.toml"
    path.parent.mkdir()
    path.write_text(GOOD)
    config = load_config(path)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9000)
    assert config.server.database == path.parent / "broker.sqlite"
    assert config.policy.heartbeat_timeout == 60.0 and config.policy.queue_timeout == 600.0
    assert [s.id for s in config.slots] == ["gpu1/0", "gpu2/0", "gpu2/1"]
    assert config.slot("gpu2/0").simulated and not config.slot("gpu2/1").simulated
    assert config.host("gpu2").is_local and config.host("gpu2").known_hosts is None
    assert config.host("gpu1").known_hosts == "~/.ssh/known_hosts"
    with pytest.raises(KeyError):
        config.host("gpu9")
    with pytest.raises(KeyError):
        config.slot("gpu1/7")


def test_user_and_key_templates() -> None:
    text = GOOD.replace(
        'address = "gpu1.example.org"',
        'address = "gpu1.example.org"\nuser = "u-{username}"\nkey_file = "~/keys/{username}"',
    )
    host = parse_config(text).host("gpu1")
    assert host.ssh_user("ana") == "u-ana"
    assert host.key_path("ana") == str(Path.home() / "keys" / "ana")
    assert parse_config(GOOD).host("gpu1").key_path("ana") is None
    assert parse_config(GOOD).host("gpu1").ssh_user("ana") == "ana"


def test_templates_allow_only_username() -> None:
    text = GOOD.replace('address = "local"', 'address = "local"\nuser = "{user}"')
    issue = only_issue(text)
    assert issue.key == "hosts[1].user" and issue.line == line_of(text, "{user}")
    assert "only {username}" in issue.message


def test_server_host_and_port_form_and_database_paths() -> None:
    text = GOOD.replace(
        'listen = "127.0.0.1:9000"', 'host = "0.0.0.0"\nport = 8800\ndatabase = "/srv/b.sqlite"'
    )
    server = parse_config(text, "/etc/gpu/broker.toml").server
    assert (server.host, server.port, server.database) == ("0.0.0.0", 8800, Path("/srv/b.sqlite"))
    relative = parse_config(
        GOOD.replace("[policy]", 'database = "db/x.sqlite"\n[policy]'), "/e/b.toml"
    )
    assert relative.server.database == Path("/e/db/x.sqlite")
    ipv6 = parse_config(GOOD.replace("127.0.0.1:9000", "[::1]:9001")).server
    assert (ipv6.host, ipv6.port) == ("::1", 9001)


# --- bad input: one problem each, right line, right key, a message that says the fix ----------


def test_toml_syntax_error_has_its_line() -> None:
    text = GOOD.replace('kind = "a100"', "kind = a100", 1)
    issue = only_issue(text)
    assert issue.line == line_of(text, "kind = a100")
    assert "TOML syntax error" in issue.message and issue.file == "lab.toml"
    assert str(issue).startswith(f"lab.toml:{issue.line}: TOML syntax error")


def test_unknown_key_suggests_the_right_one() -> None:
    text = GOOD.replace('device = "1"', 'devce = "1"')
    issues = issues_of(text)
    unknown = [i for i in issues if "unknown key" in i.message]
    assert len(unknown) == 1
    assert unknown[0].key == "hosts[1].slots[1].devce"
    assert unknown[0].line == line_of(text, "devce")
    assert "did you mean 'device'?" in unknown[0].message
    # the missing device is reported too, at the slot's header
    missing = [i for i in issues if "missing device" in i.message]
    assert missing and missing[0].line == line_of(text, "[[hosts.slots]]", 2)


def test_wrong_type_names_expected_and_got() -> None:
    text = GOOD.replace('address = "local"', 'address = "local"\nport = "22"')
    issue = only_issue(text)
    assert issue.key == "hosts[1].port" and issue.line == line_of(text, 'port = "22"')
    assert "must be an integer" in issue.message and "'22'" in issue.message


def test_bad_duration_says_the_accepted_forms() -> None:
    text = GOOD.replace('heartbeat_timeout = "1m"', 'heartbeat_timeout = "1 minute"')
    issue = only_issue(text)
    assert issue.key == "policy.heartbeat_timeout"
    assert issue.line == line_of(text, "heartbeat_timeout")
    assert "15m" in issue.message and "units" in issue.message


def test_heartbeat_timeout_must_exceed_twice_interval() -> None:
    text = GOOD.replace('heartbeat_timeout = "1m"', 'heartbeat_timeout = "20s"')
    issue = only_issue(text)
    assert issue.key == "policy.heartbeat_timeout" and issue.line == line_of(text, "20s")
    assert "raise heartbeat_timeout above 20s" in issue.message


def test_bad_names_and_kinds() -> None:
    text = GOOD.replace('name = "gpu2"', 'name = "gpu 2"').replace('kind = "sim"', 'kind = "s!m"')
    issues = issues_of(text)
    assert [(i.key, i.line) for i in issues] == [
        ("hosts[1].name", line_of(text, "gpu 2")),
        ("hosts[1].slots[0].kind", line_of(text, "s!m")),
    ]
    assert all("letters, digits" in i.message for i in issues)


def test_duplicate_host_name_points_at_the_second() -> None:
    text = GOOD.replace('name = "gpu2"', 'name = "gpu1"')
    issues = issues_of(text)
    dup = [i for i in issues if "duplicate host name" in i.message]
    assert len(dup) == 1 and dup[0].key == "hosts[1].name"
    assert dup[0].line == line_of(text, 'name = "gpu1"', 1) and "hosts[0]" in dup[0].message


def test_duplicate_slot_id() -> None:
    text = GOOD.replace('device = "1"', 'device = "1"\n  id = "gpu1/0"')
    issue = only_issue(text)
    assert issue.key == "hosts[1].slots[1].id" and issue.line == line_of(text, 'id = "gpu1/0"')
    assert "hosts[0].slots[0]" in issue.message and "unique id" in issue.message


@pytest.mark.parametrize("listen, port", [(None, "70000"), (None, "-1"), ("127.0.0.1:99999", None)])
def test_port_out_of_range(listen: str | None, port: str | None) -> None:
    if port is not None:
        text = GOOD.replace('address = "gpu1.example.org"', f"address = 'x'\nport = {port}")
        issue = only_issue(text)
        assert issue.key == "hosts[0].port" and issue.line == line_of(text, f"port = {port}")
        assert "1..65535" in issue.message
    else:
        text = GOOD.replace("127.0.0.1:9000", str(listen))
        issue = only_issue(text)
        assert issue.key == "server.listen" and issue.line == 2
        assert "HOST:PORT" in issue.message


def test_host_without_slots_points_at_the_host() -> None:
    text = GOOD.split('[[hosts]]\nname = "gpu2"')[0]
    text = text.replace('  [[hosts.slots]]\n  kind = "a100"\n  device = "0"\n', "")
    issue = only_issue(text)
    assert issue.key == "hosts[0]" and issue.line == line_of(text, "[[hosts]]")
    assert "add a [[hosts.slots]]" in issue.message


def test_real_slot_device_must_be_index_or_uuid() -> None:
    text = GOOD.replace('device = "1"', 'device = "cuda:1"')
    issue = only_issue(text)
    assert issue.key == "hosts[1].slots[1].device" and issue.line == line_of(text, "cuda:1")
    assert "GPU-<uuid>" in issue.message and "simulated = true" in issue.message
    # the same device on a simulated slot is fine
    assert parse_config(GOOD.replace('device = "0"\n  simulated', 'device = "cuda:1"\n  simulated'))


def test_count_needs_simulated() -> None:
    text = GOOD.replace('kind = "a100"\n  device = "0"', 'kind = "a100"\n  count = 3')
    issue = only_issue(text)
    assert issue.key == "hosts[0].slots[0].count" and issue.line == line_of(text, "count = 3")
    assert "simulated = true" in issue.message


def test_no_hosts_and_missing_file(tmp_path: Path) -> None:
    issue = only_issue('[server]\nlisten = "127.0.0.1:1"\n')
    assert issue.key == "hosts" and issue.line is None and "[[hosts]]" in issue.message
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "cannot read" in str(info.value) and "nope.toml" in str(info.value)


# --- many problems at once --------------------------------------------------------------------


def test_every_problem_is_reported_in_file_order() -> None:
    policy = '[policy]\nheartbeat_interval = "10s"\nheartbeat_timeout = "1m"\n'
    text = (
        GOOD.replace(policy, "")  # [policy] moves to the end: issues still come in file order
        .replace('listen = "127.0.0.1:9000"', 'lisen = "127.0.0.1:9000"')
        .replace('name = "gpu2"', 'name = "gpu1"')
        .replace('device = "1"', 'device = "one"')
    )
    text += policy.replace('"10s"', '"-3s"')
    issues = issues_of(text)
    assert [i.key for i in issues] == [
        "server.lisen",
        "hosts[1].name",
        "hosts[1].slots[1].device",
        "policy.heartbeat_interval",
    ]
    assert [i.line for i in issues] == sorted(i.line for i in issues if i.line is not None)
    error = ConfigError(issues)
    shown = str(error)
    assert shown.startswith("4 problems in the broker config:")
    assert all(str(i) in shown for i in issues) and "hint: " in shown


def test_issue_str_omits_missing_line() -> None:
    assert str(ConfigIssue("a.toml", None, "hosts", "add one")) == "a.toml: hosts: add one"
    assert str(ConfigIssue("a.toml", 3, "x.y", "fix")) == "a.toml:3: x.y: fix"


# --- the line locator -------------------------------------------------------------------------


def test_line_index_counts_array_headers_and_skips_multiline_values() -> None:
    text = (
        '[[hosts]]\nname = "a"\nnote = """\n[[hosts]]\nname = "fake"\n"""\n'
        'tags = [\n  "x",\n  ["y"]\n]\n  [[hosts.slots]]\n  kind = "k"\n'
        '[[hosts]]\nname = "b"\n  [[hosts.slots]]\n  [[hosts.slots]] # two\n  kind = "z"\n'
        "inline = { a = 1 }\n"
    )
    index = LineIndex(text)
    assert index.line_of(("hosts", 0, "name")) == 2
    assert index.line_of(("hosts", 0, "slots", 0, "kind")) == 12
    assert index.line_of(("hosts", 1, "name")) == 14
    assert index.line_of(("hosts", 1, "slots", 1, "kind")) == 17
    assert index.line_of(("hosts", 1, "slots", 1, "inline", "a")) == 18
    assert index.line_of(("hosts", 1, "slots", 0, "nothing")) == 15
    assert index.line_of(("policy", "x")) is None
    assert index.line_of(("y",)) is None  # '["y"]' inside the array is no table header


# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("90", 90),
        (45, 45),
        (1.5, 1.5),
        ("1.5h", 5400),
        (" 2m 5s ", 125),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad, words",
    [
        ("", "empty"),
        ("-5s", "negative"),
        (-1, "negative"),
        ("5x", "units"),
        ("m5", "units"),
        ("30s1m", "largest first"),
        ("1h1h", "largest first"),
        (True, "expected a duration"),
    ],
)
def test_parse_duration_rejects(bad: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "seconds, text",
    [(90, "1m30s"), (3600, "1h"), (0, "0s"), (0.25, "250ms"), (90061.5, "1d1h1m1s500ms")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text, seconds", [("1d", 86400), ("250ms", 0.25), ("1.5h", 5400)])
def test_kernelspec_reads_durations_as_the_broker_does(text: str, seconds: float) -> None:
    """One parser for the broker config and the kernelspec: what one takes, the other takes."""
    from provisioner.settings import ProvisionerSettings

    settings = ProvisionerSettings.from_config({"broker_url": "http://b:1", "lease_timeout": text})
    assert settings.lease_timeout == parse_duration(text) == seconds


@pytest.mark.parametrize("seconds", [0.001, 1, 59.999, 61, 3599, 86400 * 3 + 7, 123456.789])
def test_durations_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


# --- policy, groups, probed hosts (issue 3) -------------------------------------------------

GROUP = """
[[groups]]
name = "ml101"
members = ["ana", "ben"]
teachers = ["prof"]
kinds = ["a100"]
gpu_hours_per_day = 1.5

  [[groups.sessions]]
  days = ["tue"]
  start = "13:30"
  end = "15:00"
  reserved_slots = 2
"""


def test_policy_defaults_and_values() -> None:
    policy = parse_config(GOOD).policy
    assert (policy.idle_suspend_after, policy.idle_suspend_when_queued) == (900.0, 30.0)
    assert (policy.max_lease, policy.usage_half_life, policy.fence_retry) == (
        43200.0,
        86400.0,
        30.0,
    )
    assert policy.max_leases_per_user == 4 and policy.checkpoint_max_age == 7 * 86400
    assert policy.checkpoint_dir is None
    text = GOOD.replace(
        'heartbeat_timeout = "1m"',
        'heartbeat_timeout = "1m"\nidle_suspend_after = "5m"\nmax_leases_per_user = 2\n'
        'checkpoint_dir = "/shared/ck"',
    )
    policy = parse_config(text).policy
    assert policy.idle_suspend_after == 300 and policy.max_leases_per_user == 2
    assert policy.checkpoint_dir == "/shared/ck"


def test_idle_when_queued_must_not_exceed_idle_after() -> None:
    text = GOOD.replace(
        'heartbeat_timeout = "1m"', 'heartbeat_timeout = "1m"\nidle_suspend_when_queued = "1h"'
    )
    issue = only_issue(text)
    assert issue.key == "policy.idle_suspend_when_queued" and issue.line == line_of(text, '"1h"')
    assert "must not be more than idle_suspend_after (15m)" in issue.message


def test_groups_parse() -> None:
    config = parse_config(GOOD + GROUP)
    group = config.group("ml101")
    assert group.members == {"ana", "ben"} and group.teachers == {"prof"}
    assert group.kinds == ("a100",) and group.max_slots_per_user == 1 and group.priority == 0
    assert group.gpu_hours_per_day == 1.5
    assert group.sessions == (ClassSession(frozenset({1}), 13 * 60 + 30, 15 * 60, 2),)


@pytest.mark.parametrize(
    "old, new, key, words",
    [
        ('"ana", "ben"', '"ana", "ana"', "groups[0].members", "listed twice"),
        ('["prof"]', '["prof", 3]', "groups[0].teachers", "non-empty string"),
        ('kinds = ["a100"]', 'kinds = ["h100"]', "groups[0].kinds", "no slot of kind 'h100'"),
        (
            "reserved_slots = 2",
            "reserved_slots = 3",
            "groups[0].sessions[0].reserved_slots",
            "2 slots",
        ),
        ('end = "15:00"', 'end = "13:00"', "groups[0].sessions[0].end", "after start"),
        ('start = "13:30"', 'start = "1:30pm"', "groups[0].sessions[0].start", "HH:MM"),
        ('["tue"]', '["tues"]', "groups[0].sessions[0].days", "unknown day"),
        (
            "gpu_hours_per_day = 1.5",
            "gpu_hours_per_day = 0",
            "groups[0].gpu_hours_per_day",
            "more than 0",
        ),
        (
            'name = "ml101"',
            'name = "ml101"\nmax_slot_per_user = 2',
            "groups[0].max_slot_per_user",
            "did you mean",
        ),
    ],
)
def test_bad_groups(old: str, new: str, key: str, words: str) -> None:
    text = GOOD + GROUP.replace(old, new)
    issue = only_issue(text)
    assert issue.key == key and words in issue.message
    assert issue.line == line_of(
        text, new.split("\n")[-1].split(" = ")[0].strip() if "\n" in new else new
    )


def test_duplicate_group_name() -> None:
    issue = only_issue(GOOD + GROUP + GROUP.replace("[[groups.sessions]]", "[[groups.sessions]]"))
    assert issue.key == "groups[1].name" and "duplicate group name" in issue.message


def test_auto_gpus_host_and_with_slots() -> None:
    text = GOOD.replace(
        '  [[hosts.slots]]\n  kind = "a100"\n  device = "0"\n\n[[hosts]]',
        'gpus = "auto"\nkind_map = { "NVIDIA A100-SXM4-40GB" = "a100" }\n\n[[hosts]]',
    )
    config = parse_config(text + GROUP.replace('["a100"]', '["h100"]'))  # kinds unchecked
    host = config.host("gpu1")
    assert (
        host.auto_gpus
        and host.slots == ()
        and host.kind_map == (("NVIDIA A100-SXM4-40GB", "a100"),)
    )
    assert host.kind_for("NVIDIA A100-SXM4-40GB") == "a100"
    assert host.kind_for("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    probed = config.with_slots("gpu1", [SlotConfig("gpu1/0", "gpu1", "a100", "0", False)])
    assert [s.id for s in probed.slots] == ["gpu1/0", "gpu2/0", "gpu2/1"]
    assert config.host("gpu1").slots == ()  # the original is unchanged
    with pytest.raises(ValueError, match="duplicate"):
        config.with_slots("gpu1", [SlotConfig("gpu2/0", "gpu1", "a100", "0", False)])
    with pytest.raises(KeyError):
        config.with_slots("nope", [])
    both = text.replace(
        'gpus = "auto"', 'gpus = "auto"\n  [[hosts.slots]]\n  kind = "a"\n  device = "0"'
    )
    assert "not both" in only_issue(both).message
    bad = text.replace('gpus = "auto"', "gpus = 2")
    assert only_issue(bad).key == "hosts[0].gpus"


# --- combinations that cannot work, host names on disk, the fencing account (issues 8, 9) --------


@pytest.mark.parametrize(
    "policy, key, words",
    [
        ('fence_save_grace = "11m"', "fence_save_grace", "waits at most that long"),
        ('suspend_retry = "5s"', "suspend_retry", "given again before it arrived"),
        ('busy_grace = "5h"\nmax_lease = "4h"', "busy_grace", "shorter than max_lease"),
        ("max_queued_per_user = 0", "max_queued_per_user", "must be 1 or more"),
    ],
)
def test_policies_that_cannot_work_are_refused(policy: str, key: str, words: str) -> None:
    text = GOOD.replace('heartbeat_timeout = "1m"', f'heartbeat_timeout = "1m"\n{policy}')
    [issue] = issues_of(text)
    assert issue.key == f"policy.{key}" and words in issue.message, issue
    assert issue.line == text.splitlines().index(policy.splitlines()[0]) + 1


def test_policy_defaults_work_without_tuning() -> None:
    """The fence asks a kernel to save before it kills it, and waits long enough for a big
    save; an order a busy kernel must obey leaves its cell time to end."""
    policy = parse_config(GOOD).policy
    assert policy.fence_save_grace >= 30 and policy.busy_grace >= 30
    assert policy.max_queued_per_user == 3 and policy.suspend_retry == 300


@pytest.mark.parametrize("name", ["..", ".hidden", "-x", "a" * 65, "a/b"])
def test_host_names_must_be_directory_names(name: str) -> None:
    text = GOOD.replace('name = "gpu2"', f'name = "{name}"')
    [issue] = issues_of(text)
    assert issue.key == "hosts[1].name" and "names a directory on the host" in issue.message


def test_an_ssh_host_needs_a_fencing_account() -> None:
    text = GOOD.replace('fence_user = "gpufence"\n', "")
    [issue] = issues_of(text)
    assert issue.key == "hosts[0]" and "missing fence_user" in issue.message
    assert "gpu_kernel fence" in issue.message and "Fencing" in issue.message
    host = parse_config(GOOD).host("gpu1")
    assert (host.fence_user, host.fence_key_file) == ("gpufence", "/etc/gpu-broker/fence_ed25519")
    assert parse_config(GOOD).host("gpu2").fence_user is None  # "local": no SSH at all
