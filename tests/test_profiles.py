"""Export profiles, batch files and the config file: what is accepted, and the errors that name
the file, the profile and the export."""

from __future__ import annotations

import json
import time

import pytest

from config.settings import Settings
from tasks.jobs.batch import read_batch
from tasks.jobs.checks import InvalidSpec
from tasks.kinds.megatron_trtllm import ConvertSpec
from tasks.kinds.powerinfer_index import IndexSpec
from tasks.triggers.profiles import ProfileError, check_iteration, load_profiles
from tasks.triggers.signing import BadSignature, sign, verify

TOML = """
timeout_note = "settings and profiles share the file"
[porter]
max_deliveries = 5

[profiles.llama-70b]
output = "s3://exports/{model}/{iteration}/{export}"
notify = "https://ci.example.com/hook"

[profiles.llama-70b.exports.tp8]
kind = "megatron-trtllm"
tp = 8
dtype = "bfloat16"

[profiles.llama-70b.exports.pi-24g]
kind = "powerinfer-index"
activations = "{checkpoint}/activations"
budgets = [{ vram_capacity = 25769803776, capacity = 212992 }]
"""

YAML = """
porter:
  max_deliveries: 5
profiles:
  llama-70b:
    output: "s3://exports/{model}/{iteration}/{export}"
    notify: https://ci.example.com/hook
    exports:
      tp8: {kind: megatron-trtllm, tp: 8, dtype: bfloat16}
      pi-24g:
        kind: powerinfer-index
        activations: "{checkpoint}/activations"
        budgets: [{vram_capacity: 25769803776, capacity: 212992}]
"""


def test_toml_and_yaml_profiles_expand_to_the_same_job_specs(tmp_path, monkeypatch):
    (tmp_path / "p.toml").write_text(
        TOML.replace('timeout_note = "settings and profiles share the file"\n', "")
    )
    (tmp_path / "p.yaml").write_text(YAML)
    expanded = []
    for name in ("p.toml", "p.yaml"):
        profile = load_profiles(str(tmp_path / name))["llama-70b"]
        assert profile.notify == ("https://ci.example.com/hook",)
        expanded.append(profile.expand("s3://ckpts/llama/iter_0003000", "3000"))
        monkeypatch.setenv("PORTER_CONFIG", str(tmp_path / name))
        assert Settings.from_env().max_deliveries == 5  # the settings of the same file
    assert [(e.name, s) for e, s in expanded[0]] == [(e.name, s) for e, s in expanded[1]]
    (tp8, convert), (pi, index) = expanded[0]
    assert tp8.name == "tp8" and isinstance(convert, ConvertSpec)
    assert convert.source == "s3://ckpts/llama/iter_0003000"  # the checkpoint, by default
    assert convert.output == "s3://exports/llama-70b/3000/tp8"
    assert (convert.tp, convert.dtype) == (8, "bfloat16")
    assert isinstance(index, IndexSpec) and pi.name == "pi-24g"
    assert index.activations == "s3://ckpts/llama/iter_0003000/activations"
    assert index.output == "s3://exports/llama-70b/3000/pi-24g"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("{export}", "{exprot}"), "unknown placeholder(s) exprot"),
        (("tp = 8", "tp = 0"), "export 'tp8': tp=0 is out of range"),
        (
            ("tp = 8", "tp = 8\ncolour = 1"),
            "export 'tp8': unknown field(s) in the job spec: 'colour'",
        ),
        (("https://ci.example.com/hook", "file:///etc/passwd"), "must be http(s)://"),
        (('kind = "megatron-trtllm"', 'kind = "onnx"'), "unknown job kind 'onnx'"),
        (('kind = "megatron-trtllm"', 'kind = ["megatron-trtllm"]'), "unknown job kind ['meg"),
        (('kind = "megatron-trtllm"', "kind = {a = 1}"), "unknown job kind {'a': 1}"),
        (("s3://exports/", "relative/"), "must be an s3:// URI or an absolute path"),
        (("s3://exports/", "s3://exports/../"), "'..'"),
        (('notify = "', 'nofity = "'), "unknown key(s) nofity"),
    ],
)
def test_a_bad_profile_fails_at_load_naming_file_profile_and_export(tmp_path, change, message):
    path = tmp_path / "porter.toml"
    path.write_text(TOML.replace(*change))
    with pytest.raises(ProfileError) as info:
        load_profiles(str(path))
    assert str(path) in str(info.value) and "profile 'llama-70b'" in str(info.value)
    assert message in str(info.value)


def test_profile_without_exports_and_unreadable_files(tmp_path):
    path = tmp_path / "porter.toml"
    path.write_text('[profiles.empty]\noutput = "s3://bkt/x"\n')
    with pytest.raises(ProfileError, match="profile 'empty' has no exports"):
        load_profiles(str(path))
    path.write_text("[profiles.x\n")
    with pytest.raises(ProfileError, match="cannot read the Porter config file"):
        load_profiles(str(path))
    assert load_profiles("") == {}


@pytest.mark.parametrize("bad", ["../x", "", "a/b", "x" * 65, "3000\n", "-1"])
def test_iterations_are_safe_path_components(bad):
    with pytest.raises(ProfileError):
        check_iteration(bad)
    assert check_iteration("3000") == "3000" and check_iteration("release") == "release"


def test_secrets_stay_out_of_reprs(monkeypatch):
    monkeypatch.setenv("PORTER_HOOK_SECRET", "hunter2")
    monkeypatch.setenv("PORTER_API_TOKEN", "tok-123")
    settings = Settings.from_env()
    assert settings.hook_secret == "hunter2" and settings.api_token == "tok-123"
    assert "hunter2" not in repr(settings) and "tok-123" not in repr(settings)


def test_signatures():
    body = b'{"a": 1}'
    header = sign("secret", body)
    assert verify("secret", header, body, max_age=60) == int(header[2:].split(",")[0])
    for secret, given, data, match in [
        ("", header, body, "disabled"),
        ("secret", None, body, "missing"),
        ("secret", header, body + b"x", "does not match"),
        ("other", header, body, "does not match"),
        (
            "secret",
            sign("secret", body, int(time.time()) - 600),
            body,
            r"\d+ s off \(allowed: 60 s\)",
        ),
        ("secret", "t=abc,v1=00", body, "malformed"),
        ("secret", "x" * 1000, body, "malformed"),
    ]:
        with pytest.raises(BadSignature, match=match):
            verify(secret, given, data, max_age=60)


def test_batch_files(tmp_path):
    good = {"kind": "megatron-trtllm", "source": "s3://bkt/src", "output": "s3://bkt/out", "tp": 2}
    path = tmp_path / "jobs.yaml"
    path.write_text(json.dumps([good, {**good, "output": "s3://bkt/out2", "tp": 4}]))
    assert [s.tp for s, _ in read_batch(path)] == [2, 4]  # JSON is YAML
    path.write_text(
        "jobs:\n"
        f"  - {json.dumps(good)}\n"
        f"  - {json.dumps({**good, 'tp': -1})}\n"
        f"  - {json.dumps({**good, 'source': 'rel/src'})}\n"
        "  - just a string\n"
    )
    with pytest.raises(InvalidSpec) as info:
        read_batch(path)
    text = str(info.value)
    assert text.startswith(f"{path}: 3 invalid job spec(s); nothing was submitted")
    assert "entry 2: tp" in text and "entry 3: source" in text and "entry 4:" in text
    assert "entry 1" not in text
    for content, match in [("", "non-empty list"), ("{a: [", "cannot read"), ("{x: 1}", "list")]:
        path.write_text(content)
        with pytest.raises(InvalidSpec, match=match):
            read_batch(path)
    with pytest.raises(InvalidSpec, match="cannot read"):
        read_batch(tmp_path / "missing.yaml")
