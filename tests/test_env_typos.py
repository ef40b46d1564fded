"""A misspelt DEPOIS_* variable of a `run` setting stops start-up; a platform's own DEPOIS_*
variables do not (found by an operator walkthrough, stop 43).

Before: `DEPOIS_VERIFY_SIGNATUR=team.pub` was one warning line, and the filter then served a model
signed by another key (exit 0): the operator meant to verify and nothing did. A misspelt flag or
config-file key was already refused (exit 2). The other side of the same rule: replay, which
refused any unknown name with a close match, refused Kubernetes' service-link variables for the
Service `depois-consumer` (DEPOIS_CONSUMER_SERVICE_PORT_METRICS "did you mean
DEPOIS_BOOTSTRAP_SERVERS?"), i.e. it could not run inside the filter's pod.
"""

from __future__ import annotations

from pathlib import Path

from depois_stream.audit.settings import unknown_replay_env
from depois_stream.filter.config import ConfigError, load_config, unknown_env
from tests.test_startup_refusals import one_line_exit_2, run_cli

# What the kubelet injects into every pod of the namespace for the Service depois-consumer
# (deploy/kubernetes/base/service.yaml, port 9108 named metrics), and for a Service depois-x.
SERVICE_LINKS = dict.fromkeys([
    "DEPOIS_CONSUMER_SERVICE_HOST", "DEPOIS_CONSUMER_SERVICE_PORT", "DEPOIS_CONSUMER_SERVICE_PORT_METRICS",
    "DEPOIS_CONSUMER_PORT", "DEPOIS_CONSUMER_PORT_9108_TCP", "DEPOIS_CONSUMER_PORT_9108_TCP_PROTO",
    "DEPOIS_CONSUMER_PORT_9108_TCP_PORT", "DEPOIS_CONSUMER_PORT_9108_TCP_ADDR", "DEPOIS_X_SERVICE_HOST",
], "10.0.0.1")


def test_a_misspelt_setting_stops_run_and_names_the_setting(centroid_model: Path, tmp_path: Path) -> None:
    key = tmp_path / "team.pub"
    key.write_text("not needed: start-up stops before reading it")
    proc = run_cli("run", "--model-path", str(centroid_model), "--device", "cpu",
                   env={"DEPOIS_VERIFY_SIGNATUR": str(key)})
    one_line_exit_2(proc, "DEPOIS_VERIFY_SIGNATUR (did you mean DEPOIS_VERIFY_SIGNATURE?)")
    assert "correct or unset it" in proc.stderr.decode()


def test_misspellings_are_refused_and_platform_variables_only_warned_about() -> None:
    refused, warned = unknown_env({**SERVICE_LINKS, "DEPOIS_BATCHSIZE": "64", "depois_clean_topc": "c",
                                   "DEPOIS_SOMETHING_ELSE": "1", "DEPOIS_SIGN_KEY_PASSWRD": "p"})
    assert refused == ["DEPOIS_BATCHSIZE (did you mean DEPOIS_BATCH_SIZE?)",
                       "depois_clean_topc (did you mean DEPOIS_CLEAN_TOPIC?)"]
    # another tool's variable misspelt is not run's business: warned, as the platform's are
    assert {w.split(" ")[0] for w in warned} == {*SERVICE_LINKS, "DEPOIS_SOMETHING_ELSE", "DEPOIS_SIGN_KEY_PASSWRD"}


def test_replay_runs_beside_the_platform_s_service_variables() -> None:
    refused, warned = unknown_replay_env({**SERVICE_LINKS, "DEPOIS_CLEAN_TOPC": "x"})
    assert refused == ["DEPOIS_CLEAN_TOPC (did you mean DEPOIS_CLEAN_TOPIC?)"]
    assert {w.split(" ")[0] for w in warned} == set(SERVICE_LINKS)


def test_an_empty_path_is_refused_as_empty_not_read_as_the_current_folder(centroid_model: Path) -> None:
    import pytest

    with pytest.raises(ConfigError, match="verify_signature: is empty"):
        load_config(model_path=centroid_model, verify_signature="")
    proc = run_cli("run", "--model-path", str(centroid_model), "--device", "cpu",
                   env={"DEPOIS_VERIFY_SIGNATURE": ""})
    one_line_exit_2(proc, "verify_signature: is empty")


def test_service_links_of_any_service_name_are_never_refused_and_rescore_s_key_typo_is() -> None:
    """Review (stop 43): a Service named depois-model brings DEPOIS_MODEL_PORT=tcp://..., close to
    DEPOIS_MODEL_PATH, and the first rule refused it (run exited 2); and replay, whose rescore now
    reads DEPOIS_VERIFY_SIGNATURE, only warned about DEPOIS_VERIFY_SIGNATUR."""
    links = {"DEPOIS_MODEL_PORT": "tcp://10.0.0.1:80", "DEPOIS_CONTROL_PORT": "tcp://10.0.0.2:80",
             "DEPOIS_MODEL_PORT_80_TCP": "tcp://10.0.0.1:80", "DEPOIS_MODEL_SERVICE_PORT_HTTP": "80"}
    refused, warned = unknown_env({**links, "DEPOIS_METRIC_PORT": "9108"})
    assert refused == ["DEPOIS_METRIC_PORT (did you mean DEPOIS_METRICS_PORT?)"]  # a typo, not a link
    assert {w.split(" ")[0] for w in warned} == set(links)
    assert unknown_replay_env({**links, "DEPOIS_VERIFY_SIGNATUR": "/k.pem"})[0] == [
        "DEPOIS_VERIFY_SIGNATUR (did you mean DEPOIS_VERIFY_SIGNATURE?)"]
