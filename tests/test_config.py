"""Settings: seed defaults, TOML and CLI overrides, instance selection, every refusal."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

import config
from config import InstanceConfig, Settings, add_cli_arguments, load_settings, settings_from_args
from statemachine.errors import BadConfig
from statemachine.plan import JobKind


def write(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refusal(overrides: dict | None = None, config_file: Path | None = None) -> str:
    with pytest.raises(BadConfig) as info:
        load_settings(config_file, overrides)
    return str(info.value)


def instance(**changes) -> dict:
    return {"instance_id": "gpu", "host": "127.0.0.1", "port": 8188, "job_types": ["HIGH"],
            "max_concurrent": 2, "enabled": True, **changes}


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser.parse_args(argv)


# --- defaults -----------------------------------------------------------------------------


def test_defaults_are_the_seed_values():
    s = load_settings()
    assert s.enable_dual_instance is True
    assert s.instances == (
        InstanceConfig("high_priority", "127.0.0.1", 8188, frozenset({"HIGH", "COMBINE"}), 2,
                       True),
        InstanceConfig("low_priority", "127.0.0.1", 8189, frozenset({"LOW", "COMBINE"}), 2,
                       True),
    )
    assert (s.max_retries, s.retry_delay, s.retry_delay_max) == (3, 5, 300)
    assert (s.frames_per_chunk, s.max_frames) == (101, 100_000)
    assert (s.default_width, s.default_height) == (832, 480)
    assert (s.combine_gate, s.combine_concurrency, s.fallback) == ("batch", 1, True)
    assert s.state_dir == Path("./var")
    assert (s.instance_lost_timeout, s.health_interval, s.probe_backoff_max) == (120, 5, 60)
    assert (s.request_timeout, s.connect_timeout) == (30, 3.05)
    assert dict(s.workflows) == {"HIGH": "workflows/demo/high.json",
                                 "LOW": "workflows/demo/low.json",
                                 "COMBINE": "workflows/demo/combine.json"}
    assert (s.artifact_transfer, s.artifact_dir) == ("http", Path("./var/artifacts"))


def test_artifact_dir_follows_state_dir_unless_set(tmp_path):
    assert load_settings(overrides={"STATE_DIR": tmp_path}).artifact_dir == \
        tmp_path / "artifacts"
    path = write(tmp_path, 'ARTIFACT_TRANSFER = "path"\nARTIFACT_DIR = "~/shared"\n')
    s = load_settings(path)
    assert (s.artifact_transfer, s.artifact_dir) == ("path", Path("~/shared").expanduser())


def test_module_constants_keep_the_seed_shape():
    assert config.COMFYUI_INSTANCES[0]["job_types"] == ["HIGH"]
    assert config.SINGLE_INSTANCE_CONFIG["job_types"] == ["HIGH", "LOW", "COMBINE"]
    assert (config.MAX_RETRIES, config.RETRY_DELAY, config.COMBINE_GATE) == (3, 5, "batch")


def test_settings_are_frozen_and_loading_does_not_touch_the_constants(tmp_path):
    s = load_settings(overrides={"STATE_DIR": tmp_path / "nowhere"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_retries = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.workflows["HIGH"] = "x"  # type: ignore[index]
    assert not (tmp_path / "nowhere").exists()
    assert config.COMFYUI_INSTANCES[0]["job_types"] == ["HIGH"]


def test_edited_constants_are_picked_up(monkeypatch):
    monkeypatch.setattr(config, "MAX_RETRIES", 7)
    assert load_settings().max_retries == 7


def test_instance_url_and_accepts():
    s = load_settings()
    high = s.instances[0]
    assert high.url == "http://127.0.0.1:8188"
    assert high.accepts("HIGH") and high.accepts(JobKind.HIGH) and not high.accepts("LOW")
    ipv6 = load_settings(overrides={"SINGLE_INSTANCE_CONFIG": {"host": "::1"},
                                    "ENABLE_DUAL_INSTANCE": False})
    assert ipv6.instances[0].url == "http://[::1]:8188"


# --- TOML file ----------------------------------------------------------------------------


def test_toml_overrides(tmp_path):
    path = write(tmp_path, """
MAX_RETRIES = 5
RETRY_DELAY = 0.5
COMBINE_GATE = "global"
STATE_DIR = "/srv/comfy"

[WORKFLOWS]
HIGH = "/srv/wf/high.json"

[[COMFYUI_INSTANCES]]
instance_id = "a"
host = "10.0.0.1"
port = 8188
job_types = ["HIGH", "LOW"]

[[COMFYUI_INSTANCES]]
instance_id = "b"
host = "10.0.0.2"
port = 8188
job_types = ["LOW", "COMBINE"]
max_concurrent = 1
""")
    s = load_settings(path)
    assert (s.max_retries, s.retry_delay, s.combine_gate) == (5, 0.5, "global")
    assert s.state_dir == Path("/srv/comfy")
    assert dict(s.workflows) == {"HIGH": "/srv/wf/high.json", "LOW": "workflows/demo/low.json",
                                 "COMBINE": "workflows/demo/combine.json"}
    assert [(i.instance_id, i.url, sorted(i.job_types), i.max_concurrent, i.enabled)
            for i in s.instances] == [("a", "http://10.0.0.1:8188", ["HIGH", "LOW"], 2, True),
                                      ("b", "http://10.0.0.2:8188", ["COMBINE", "LOW"], 1, True)]


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "MAX_RETRIES = 5\nFALLBACK = false\n")
    s = load_settings(path, {"MAX_RETRIES": 0})
    assert (s.max_retries, s.fallback) == (0, False)


def test_single_instance_table_is_updated_key_by_key(tmp_path):
    path = write(tmp_path, "ENABLE_DUAL_INSTANCE = false\n[SINGLE_INSTANCE_CONFIG]\nport = 9000\n")
    (single,) = load_settings(path).instances
    assert (single.instance_id, single.port) == ("single", 9000)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "MAX_RETRIES = 3\nRETRY_DELAY = = 5\n")
    assert refusal(config_file=path) == (
        f"config file {path}, line 2, column 15: TOML syntax error: Invalid value")


def test_missing_and_non_utf8_config_file(tmp_path):
    assert "cannot read it: No such file or directory" in refusal(
        config_file=tmp_path / "absent.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'STATE_DIR = "caf\xe9"\n')
    assert f"config file {path}: not UTF-8" in refusal(config_file=path)


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "MAX_RETRIE = 3\n")
    assert refusal(config_file=path) == (
        f"unknown setting MAX_RETRIE in {path}; did you mean 'MAX_RETRIES'?")
    assert "did you mean 'COMBINE_GATE'?" in refusal({"combine_gate": "batch"})
    assert "unknown setting ZZZ in overrides; known: ENABLE_DUAL_INSTANCE" in refusal(
        {"ZZZ": 1})


def test_unknown_instance_key_suggests_the_closest():
    assert refusal({"COMFYUI_INSTANCES": [instance(), instance(instance_id="x", prt=1)]}) == (
        "unknown setting COMFYUI_INSTANCES[1].prt; did you mean 'port'? (set in overrides)")


# --- instance selection -------------------------------------------------------------------


def test_single_instance_mode_uses_single_config():
    s = load_settings(overrides={"ENABLE_DUAL_INSTANCE": False})
    assert [i.instance_id for i in s.instances] == ["single"]
    assert s.instances[0].job_types == frozenset({"HIGH", "LOW", "COMBINE"})


def test_dual_mode_keeps_only_enabled_instances():
    listed = [instance(instance_id="a", job_types=["HIGH", "LOW"]),
              instance(instance_id="b", port=8189, enabled=False)]
    s = load_settings(overrides={"COMFYUI_INSTANCES": listed})
    assert [i.instance_id for i in s.instances] == ["a"]


def test_cli_flags(tmp_path):
    path = write(tmp_path, "ENABLE_DUAL_INSTANCE = false\nMAX_RETRIES = 1\n")
    single = settings_from_args(parse_args("--config", str(path)))
    assert [i.instance_id for i in single.instances] == ["single"] and single.max_retries == 1
    dual = settings_from_args(parse_args("--config", str(path), "--dual-instance",
                                         "--state-dir", str(tmp_path / "st")))
    assert [i.instance_id for i in dual.instances] == ["high_priority", "low_priority"]
    assert dual.state_dir == tmp_path / "st"
    assert [i.instance_id for i in settings_from_args(parse_args("--single-instance")).instances
            ] == ["single"]
    assert settings_from_args(parse_args()) == load_settings()


def test_cli_mode_flags_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        parse_args("--dual-instance", "--single-instance")
    assert "not allowed with argument" in capsys.readouterr().err


# --- COMBINE normalisation ----------------------------------------------------------------


def test_combine_is_added_to_every_instance_when_none_lists_it():
    assert all(i.accepts("COMBINE") for i in load_settings().instances)


def test_combine_stays_where_it_is_listed():
    listed = [instance(instance_id="a", job_types=["HIGH"]),
              instance(instance_id="b", port=8189, job_types=["LOW", "COMBINE"])]
    a, b = load_settings(overrides={"COMFYUI_INSTANCES": listed}).instances
    assert not a.accepts("COMBINE") and b.accepts("COMBINE")


def test_stealing_is_off_unless_configured_and_never_of_its_own_kinds():
    settings = load_settings()
    assert all(not i.steal_types for i in settings.instances)
    assert (settings.switch_cost, dict(settings.job_durations)) == (None, {})
    listed = [instance(instance_id="a", job_types=["HIGH"], steal_types=["LOW", "COMBINE"]),
              instance(instance_id="b", port=8189, job_types=["LOW"])]
    a, _ = load_settings(overrides={"COMFYUI_INSTANCES": listed, "SWITCH_COST": 40,
                                    "JOB_DURATIONS": {"LOW": 600}}).instances
    assert a.steal_types == {"LOW"}  # COMBINE was added to its job_types by the COMBINE rule


def test_stealing_settings_from_toml(tmp_path):
    path = write(tmp_path, 'SWITCH_COST = 12.5\nJOB_DURATIONS = { HIGH = 300, LOW = 600 }\n'
                           '[[COMFYUI_INSTANCES]]\ninstance_id = "a"\nhost = "h"\n'
                           'port = 1\njob_types = ["HIGH"]\nsteal_types = ["LOW"]\n')
    settings = load_settings(path)
    assert settings.switch_cost == 12.5
    assert dict(settings.job_durations) == {"HIGH": 300, "LOW": 600}
    assert settings.instances[0].steal_types == {"LOW"}


def test_combine_on_a_disabled_instance_does_not_count():
    listed = [instance(instance_id="a", job_types=["HIGH", "LOW"]),
              instance(instance_id="b", port=8189, job_types=["COMBINE"], enabled=False)]
    (a,) = load_settings(overrides={"COMFYUI_INSTANCES": listed}).instances
    assert a.accepts("COMBINE")


# --- refusals: key, value, what is allowed ------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"COMBINE_GATE": "phase"}, "COMBINE_GATE = 'phase': must be one of 'batch', 'global'"),
    ({"MAX_RETRIES": True}, "MAX_RETRIES = True: must be an integer >= 0"),
    ({"MAX_RETRIES": -1}, "MAX_RETRIES = -1: must be an integer >= 0"),
    ({"MAX_RETRIES": "3"}, "MAX_RETRIES = '3': must be an integer >= 0"),
    ({"FRAMES_PER_CHUNK": 4}, "FRAMES_PER_CHUNK = 4: must be an integer >= 5"),
    ({"MAX_FRAMES": 1.5}, "MAX_FRAMES = 1.5: must be a positive integer"),
    ({"COMBINE_CONCURRENCY": False}, "COMBINE_CONCURRENCY = False: must be a positive integer"),
    ({"RETRY_DELAY": 0}, "RETRY_DELAY = 0: must be a positive number of seconds"),
    ({"CONNECT_TIMEOUT": -3.05}, "CONNECT_TIMEOUT = -3.05: must be a positive number of seconds"),
    ({"REQUEST_TIMEOUT": float("inf")}, "REQUEST_TIMEOUT = inf: must be a positive number"),
    ({"HEALTH_INTERVAL": True}, "HEALTH_INTERVAL = True: must be a positive number"),
    ({"FALLBACK": 1}, "FALLBACK = 1: must be true or false"),
    ({"ENABLE_DUAL_INSTANCE": "yes"}, "ENABLE_DUAL_INSTANCE = 'yes': must be true or false"),
    ({"DEFAULT_WIDTH": 830}, "DEFAULT_WIDTH = 830: must be a multiple of 16 from 16 to 8192"),
    ({"DEFAULT_HEIGHT": 0}, "DEFAULT_HEIGHT = 0: must be a multiple of 16 from 16 to 8192"),
    ({"STATE_DIR": ""}, "STATE_DIR = '': must be a non-empty path"),
    ({"ARTIFACT_TRANSFER": "nfs"}, "ARTIFACT_TRANSFER = 'nfs': must be one of 'http', 'path'"),
    ({"ARTIFACT_DIR": 3}, "ARTIFACT_DIR = 3: must be a non-empty path"),
    ({"WORKFLOWS": ["a.json"]}, "WORKFLOWS = ['a.json']: must be a table of job kind"),
    ({"WORKFLOWS": {"HIGH": 3}}, "WORKFLOWS.HIGH = 3: must be a non-empty string"),
    ({"WORKFLOWS": {"MID": "m.json"}}, "unknown setting WORKFLOWS.MID; known: HIGH, LOW"),
    ({"RETRY_DELAY_MAX": 4}, "RETRY_DELAY_MAX = 4: must be at least RETRY_DELAY (5)"),
    ({"PROBE_BACKOFF_MAX": 1}, "PROBE_BACKOFF_MAX = 1: must be at least HEALTH_INTERVAL (5)"),
    ({"SWITCH_COST": "auto"}, "SWITCH_COST = 'auto': \"learn\", or the seconds a server takes"),
    ({"SWITCH_COST": -1}, "SWITCH_COST = -1: \"learn\", or the seconds"),
    ({"JOB_DURATIONS": {"HIGH": 0}}, "JOB_DURATIONS.HIGH = 0: must be a positive number"),
    ({"JOB_DURATIONS": {"MID": 3}}, "unknown setting JOB_DURATIONS.MID; known: HIGH, LOW"),
    ({"JOB_DURATIONS": 60}, "JOB_DURATIONS = 60: must be a table of job kind"),
])
def test_scalar_refusals(overrides, message):
    assert refusal(overrides).startswith(message)


def test_refusal_says_where_the_value_was_set(tmp_path):
    assert refusal({"COMBINE_GATE": "phase"}).endswith("(set in overrides)")
    path = write(tmp_path, 'COMBINE_GATE = "phase"\n')
    assert refusal(config_file=path).endswith(f"(set in {path})")


def test_workflows_replaced_whole_need_every_kind():
    config_workflows = {"HIGH": "h.json", "LOW": "l.json"}
    message = "WORKFLOWS = {'HIGH': 'h.json', 'LOW': 'l.json'}: needs a workflow for COMBINE"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "WORKFLOWS", config_workflows)
        assert refusal().startswith(message)


@pytest.mark.parametrize(("changes", "message"), [
    ({"port": 70000}, "COMFYUI_INSTANCES[1].port = 70000: must be an integer from 1 to 65535"),
    ({"port": True}, "COMFYUI_INSTANCES[1].port = True: must be an integer from 1 to 65535"),
    ({"max_concurrent": 0}, "COMFYUI_INSTANCES[1].max_concurrent = 0: must be a positive"),
    ({"enabled": "no"}, "COMFYUI_INSTANCES[1].enabled = 'no': must be true or false"),
    ({"job_types": ["HIGH", "MID"]}, "COMFYUI_INSTANCES[1].job_types = ['HIGH', 'MID']: "
                                     "unknown job type 'MID'; allowed: 'HIGH', 'LOW', 'COMBINE'"),
    ({"job_types": "HIGH"}, "COMFYUI_INSTANCES[1].job_types = 'HIGH': must be a non-empty list"),
    ({"job_types": []}, "COMFYUI_INSTANCES[1].job_types = []: must be a non-empty list"),
    ({"instance_id": "a b"}, "COMFYUI_INSTANCES[1].instance_id = 'a b': must be a name of"),
    ({"host": "http://10.0.0.1"}, "COMFYUI_INSTANCES[1].host = 'http://10.0.0.1': must be a "
                                  "host name, an IPv4 address or an IPv6 address only"),
    *[({"host": bad}, f"COMFYUI_INSTANCES[1].host = {bad!r}: must be a host name")
      for bad in ("127.0.0.1#", "127.0.0.1?", "127.0.0.1 evil", "[::1", "999.1.1.1", "a..b",
                  "-gpu", "fe80::1%eth0", "gpu/box", "x" * 64)],
    ({"host": "10.0.0.1:8188"}, "COMFYUI_INSTANCES[1].host = '10.0.0.1:8188': must be a host"),
    ({"host": ""}, "COMFYUI_INSTANCES[1].host = '': must be a non-empty string"),
    ({"steal_types": ["MID"]}, "COMFYUI_INSTANCES[1].steal_types = ['MID']: unknown job type"),
    ({"steal_types": "LOW"}, "COMFYUI_INSTANCES[1].steal_types = 'LOW': must be a list of"),
    ({"steal_types": ["LOW", "HIGH"]}, "COMFYUI_INSTANCES[1].steal_types = ['HIGH', 'LOW']: "
                                       "'HIGH' is in its job_types already"),
])
def test_instance_refusals(changes, message):
    listed = [instance(instance_id="a"), instance(**{"instance_id": "b", "port": 8189, **changes})]
    assert refusal({"COMFYUI_INSTANCES": listed}).startswith(message)


def test_instance_shape_refusals():
    assert refusal({"COMFYUI_INSTANCES": {"instance_id": "a"}}).startswith(
        "COMFYUI_INSTANCES = {'instance_id': 'a'}: must be a list of instance tables")
    assert refusal({"COMFYUI_INSTANCES": ["gpu0"]}).startswith(
        "COMFYUI_INSTANCES[0] = 'gpu0': must be a table with keys instance_id, host, port")
    assert refusal({"COMFYUI_INSTANCES": [{"instance_id": "a", "host": "h"}]}).startswith(
        "COMFYUI_INSTANCES[0] = {'instance_id': 'a', 'host': 'h'}: missing port, job_types")
    assert refusal({"SINGLE_INSTANCE_CONFIG": {"port": 0}}).startswith(
        "SINGLE_INSTANCE_CONFIG.port = 0: must be an integer from 1 to 65535")


def test_disabled_entries_are_still_checked():
    listed = [instance(job_types=["HIGH", "LOW"]), instance(instance_id="x", port="8190",
                                                            enabled=False)]
    assert refusal({"COMFYUI_INSTANCES": listed}).startswith("COMFYUI_INSTANCES[1].port = '8190'")


def test_duplicate_instance_id():
    listed = [instance(instance_id="a"), instance(instance_id="a", port=8189)]
    assert refusal({"COMFYUI_INSTANCES": listed}) == (
        "COMFYUI_INSTANCES[1].instance_id = 'a': already used by COMFYUI_INSTANCES[0]; each "
        "active instance needs its own id")


def test_duplicate_host_and_port():
    listed = [instance(instance_id="a"), instance(instance_id="b", host="127.0.0.1")]
    assert refusal({"COMFYUI_INSTANCES": listed}) == (
        "COMFYUI_INSTANCES[1].port = 8188: COMFYUI_INSTANCES[0] already uses 127.0.0.1:8188; "
        "give each active instance its own host:port, or disable one")


def test_duplicates_among_disabled_entries_are_allowed():
    listed = [instance(instance_id="a", job_types=["HIGH", "LOW"]),
              instance(instance_id="a", enabled=False)]
    assert [i.instance_id for i in load_settings(overrides={"COMFYUI_INSTANCES": listed})
            .instances] == ["a"]


def test_no_active_instance():
    listed = [instance(enabled=False)]
    assert refusal({"COMFYUI_INSTANCES": listed}).startswith(
        "no active instance: ENABLE_DUAL_INSTANCE = True but no COMFYUI_INSTANCES entry is "
        "enabled")
    assert refusal({"COMFYUI_INSTANCES": []}).startswith("no active instance")
    assert refusal({"ENABLE_DUAL_INSTANCE": False,
                    "SINGLE_INSTANCE_CONFIG": {"enabled": False}}).startswith(
        "no active instance: ENABLE_DUAL_INSTANCE = False but SINGLE_INSTANCE_CONFIG.enabled "
        "= False")


def test_job_type_nobody_accepts_needs_fallback():
    listed = [instance(instance_id="a", job_types=["HIGH"])]
    assert refusal({"COMFYUI_INSTANCES": listed, "FALLBACK": False}) == (
        "no active instance accepts LOW jobs (active: a: COMBINE, HIGH) and FALLBACK = False: "
        "add 'LOW' to the job_types of an instance, or set FALLBACK = True")
    s = load_settings(overrides={"COMFYUI_INSTANCES": listed, "FALLBACK": True})
    assert not s.instances[0].accepts("LOW")


def test_settings_type_is_exported():
    assert isinstance(load_settings(), Settings)


@pytest.mark.parametrize(("host", "kept", "url"), [
    ("127.0.0.1", "127.0.0.1", "http://127.0.0.1:8189"),
    ("gpu-box.lan", "gpu-box.lan", "http://gpu-box.lan:8189"),
    ("comfy_low", "comfy_low", "http://comfy_low:8189"),
    ("[::1]", "::1", "http://[::1]:8189"),
    ("::1", "::1", "http://[::1]:8189"),
    ("[2001:DB8::0:1]", "2001:db8::1", "http://[2001:db8::1]:8189"),
])
def test_hosts_are_host_names_or_addresses(host, kept, url):
    listed = [instance(instance_id="a"), instance(instance_id="b", port=8189, host=host)]
    [_, b] = config.load_settings(None, {"COMFYUI_INSTANCES": listed}).instances
    assert (b.host, b.url) == (kept, url)
