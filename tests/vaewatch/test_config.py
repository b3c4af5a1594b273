"""Settings: config.yaml, --set overrides, environment, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaewatch.cli import main
from vaewatch.config import ConfigError, Settings, load_settings

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


def test_repository_config_is_valid() -> None:
    settings = load_settings(REPO_CONFIG, env={})
    assert set(settings.model_dump()) == set(Settings.model_fields)


@pytest.mark.parametrize("section", ["data", "model", "train", "calibration", "detector"])
def test_repository_config_states_the_code_defaults(section: str) -> None:
    """config.yaml documents every setting; its values are the built-in defaults, so running
    without a config file trains the same model as running with it."""
    from_file = getattr(load_settings(REPO_CONFIG, env={}), section)
    assert from_file == getattr(Settings(), section)


def test_overrides_are_yaml_and_win_over_file_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 3\n  lr: 0.01\n")
    settings = load_settings(
        config,
        ["data.normal_classes=[3, 4]", "train.epochs=7", "train.amp=false"],
        env={"VAEWATCH_TRAIN__EPOCHS": "5", "VAEWATCH_TRAIN__BATCH_SIZE": "32"},
    )
    assert settings.data.normal_classes == (3, 4)
    assert settings.train.epochs == 7
    assert settings.train.batch_size == 32
    assert settings.train.lr == 0.01
    assert settings.train.amp is False


@pytest.mark.parametrize(
    ("content", "overrides", "expected"),
    [
        ("train:\n  epochz: 3\n", [], "unknown key 'train.epochz'"),
        ("train:\n  epochs: many\n", [], "train.epochs"),
        ("model:\n  likelihood: poisson\n", [], "model.likelihood"),
        ("data:\n  dataset: cifar\n", [], "data.dataset"),
        ("calibration:\n  target_fpr: 2\n", [], "calibration.target_fpr"),
        ("train: [1, 2\n", [], "not valid YAML"),
        ("", ["train.epochs=0"], "train.epochs"),
        ("", ["model.conv_channels=[8]"], "model.conv_channels"),
        ("", ["nosuch.key=1"], "unknown section 'nosuch'"),
        ("", ["train.epochs"], "expected section.key=value"),
        ("", ["data.normal_classes=[1"], "data.normal_classes"),
        # A union's forms, all named for the field itself (not "train.amp.bool").
        ("", ["train.amp=maybe"], "train.amp: Input should be a valid boolean"),
        ("", ["train.amp=maybe"], "; or Input should be 'auto' (got 'maybe')"),
        ("", ["train.progress=7"], "train.progress: "),
    ],
)
def test_errors_are_one_line_naming_the_key(
    tmp_path: Path, content: str, overrides: list[str], expected: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_settings(config, overrides, env={})
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_config_error_exits_2_without_traceback(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  latent_dimm: 3\n")
    code = main(["--config", str(config), "sample", "--model", str(tmp_path), "--out", "x.png"])
    captured = capsys.readouterr()
    assert code == 2
    assert (
        captured.err.strip() == "vaewatch: error: " + f"{config}: unknown key 'model.latent_dimm'"
    )
    assert "Traceback" not in captured.err


def test_cli_bad_override_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["--set", "train.batch_size=-1", "train", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "train.batch_size" in err


# --- secrets (issue 9, finding 6): verbatim from the environment, never echoed, always masked ----

SECRET = "stream.sasl_password"


@pytest.mark.parametrize(
    "raw",
    [
        "hunter2 #2024",
        "null",
        "~",
        "123456",
        "@Secret!",
        "",
        " padded ",
        "'quoted'",
        "[1, 2",
        "a: b",
    ],
)
def test_secrets_from_the_environment_are_taken_verbatim(raw: str) -> None:
    settings = load_settings(None, env={"VAEWATCH_STREAM__SASL_PASSWORD": raw})
    assert settings.stream.sasl_password is not None
    assert settings.stream.sasl_password.get_secret_value() == raw


def test_secrets_from_set_are_taken_verbatim() -> None:
    settings = load_settings(None, [f"{SECRET}=hunter2 #2024"], env={})
    assert settings.stream.sasl_password.get_secret_value() == "hunter2 #2024"


def test_every_secret_setting_is_known() -> None:
    from vaewatch.config import secret_keys

    assert SECRET in secret_keys()
    assert "stream.sasl_username" not in secret_keys()


@pytest.mark.parametrize(
    ("content", "overrides", "env"),
    [
        ("stream:\n  sasl_password: 123456\n", [], {}),
        ("stream:\n  sasl_password: [123456]\n", [], {}),
        ("", ["stream.sasl_passwrd=123456"], {}),  # misspelt: not known to be a secret
        ("", ["stream.sasl_passwrd=[123456"], {}),
        ("", [], {"VAEWATCH_STREAM__SASL_PASSWRD": "[123456"}),
        ("", [], {"VAEWATCH_STREAMS__SASL_PASSWORD": "123456"}),
        ("", ["stream.max_batch_size=0"], {"VAEWATCH_STREAM__SASL_PASSWORD": "123456"}),
    ],
)
def test_errors_never_echo_a_secret(
    tmp_path: Path, content: str, overrides: list[str], env: dict[str, str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_settings(config, overrides, env=env)
    assert "123456" not in str(info.value)
    assert "\n" not in str(info.value)


def test_a_secret_of_the_wrong_type_in_a_file_says_to_quote_it(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("stream:\n  sasl_password: 123456\n")
    with pytest.raises(ConfigError, match=r"stream\.sasl_password: .*quote it") as info:
        load_settings(config, env={})
    assert "123456" not in str(info.value)


def test_secrets_are_masked_in_repr_and_dumps() -> None:
    settings = load_settings(None, env={"VAEWATCH_STREAM__SASL_PASSWORD": "hunter2 #2024"})
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.stream)):
        assert "hunter2" not in text


def test_secrets_are_masked_in_log_lines() -> None:
    """kafka-python's admin client logs its whole configuration, password included, at DEBUG."""
    import io
    import logging

    from vaewatch.secret_settings import mask_secrets_in_logs

    settings = load_settings(None, env={"VAEWATCH_STREAM__SASL_PASSWORD": "hunter2 #2024"})
    logger = logging.getLogger("test_secret_masking")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        mask_secrets_in_logs(settings, logger)
        configs = {"sasl_plain_password": "hunter2 #2024", "bootstrap_servers": "kafka:9092"}
        logger.warning("Starting KafkaAdminClient with configuration: %s", configs)
        try:
            raise RuntimeError("login failed for password hunter2 #2024")
        except RuntimeError:
            logger.exception("connect")
        logging.raiseExceptions = False  # a malformed call still goes to the handler
        logger.warning("%d items", "not a number")
    finally:
        logging.raiseExceptions = True
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "hunter2" not in output
    assert "'sasl_plain_password': '**********'" in output and "kafka:9092" in output
    assert "login failed for password **********" in output


def test_vaewatch_config_prints_the_effective_settings_with_secrets_masked(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 3\n  lr: 0.01\nstream:\n  input_topic: from-file\n")
    monkeypatch.setenv("VAEWATCH_STREAM__SASL_PASSWORD", "hunter2 #2024")
    monkeypatch.setenv("VAEWATCH_TRAIN__EPOCHS", "5")
    code = main(["--config", str(config), "--set", "data.normal_classes=[3, 4]", "config"])
    out = capsys.readouterr().out
    assert code == 0
    assert "hunter2" not in out
    shown = yaml.safe_load(out)
    assert shown["stream"]["sasl_password"] == "**********"
    assert shown["train"]["epochs"] == 5 and shown["train"]["lr"] == 0.01
    assert shown["stream"]["input_topic"] == "from-file"
    assert shown["data"]["normal_classes"] == [3, 4]
    assert set(shown) == set(Settings.model_fields)
    # What it prints is a settings file: read back, it gives the same settings (but the secret).
    again = tmp_path / "again.yaml"
    again.write_text(out)
    monkeypatch.delenv("VAEWATCH_STREAM__SASL_PASSWORD")
    monkeypatch.delenv("VAEWATCH_TRAIN__EPOCHS")
    reread = load_settings(again, env={})
    expected = load_settings(
        config,
        ["data.normal_classes=[3, 4]", "train.epochs=5", "stream.sasl_password=**********"],
        env={},
    )
    assert reread.model_dump(mode="json") == expected.model_dump(mode="json")


def test_vaewatch_config_shows_an_unset_secret_as_null(capsys, monkeypatch) -> None:
    import yaml

    monkeypatch.delenv("VAEWATCH_STREAM__SASL_PASSWORD", raising=False)
    assert main(["--config", "/dev/null", "config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["stream"]["sasl_password"] is None


def test_a_set_without_equals_echoes_only_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, ["stream.sasl_password:hunter2"], env={})
    assert "hunter2" not in str(info.value)
    assert "'stream.sasl_password'" in str(info.value)


def test_an_error_about_a_whole_section_does_not_print_the_section() -> None:
    """A section-level check sees the whole section as its input, secrets included."""
    with pytest.raises(ConfigError) as info:
        load_settings(None, ["model.latent_components=0", "model.latent_weight=1.0"], env={})
    message = str(info.value)
    assert "latent_weight" in message and "(got {" not in message
