"""config.yaml and docs/settings.md are generated from the settings' field descriptions."""

from __future__ import annotations

from vaewatch import settings_docs
from vaewatch.config import Settings, load_settings


def test_every_section_and_setting_has_a_description() -> None:
    assert settings_docs.missing_descriptions() == [], (
        "add Field(description=...) to these settings"
    )


def test_config_yaml_and_settings_page_are_current() -> None:
    stale = [str(p.relative_to(settings_docs.REPO)) for p in settings_docs.stale()]
    assert stale == [], "stale: run `python -m vaewatch.settings_docs --write`"


def test_config_yaml_holds_the_built_in_defaults() -> None:
    assert load_settings(settings_docs.CONFIG_YAML, env={}) == Settings()


def test_every_setting_is_in_config_yaml_and_the_page() -> None:
    yaml_text, page = settings_docs.config_yaml(), settings_docs.settings_md()
    for section, field in Settings.model_fields.items():
        for key in field.annotation.model_fields:
            assert f"| `{section}.{key}` |" in page
        assert f"\n{section}:\n" in yaml_text


def test_check_reports_a_stale_file(tmp_path, monkeypatch, capsys) -> None:
    stale_yaml = tmp_path / "config.yaml"
    stale_yaml.write_text(settings_docs.config_yaml().replace("epochs: 15", "epochs: 16"))
    monkeypatch.setattr(settings_docs, "REPO", tmp_path)
    monkeypatch.setattr(settings_docs, "CONFIG_YAML", stale_yaml)
    monkeypatch.setattr(settings_docs, "SETTINGS_MD", tmp_path / "settings.md")
    assert settings_docs.main(["--check"]) == 1
    assert "config.yaml is stale" in capsys.readouterr().out
    assert settings_docs.main(["--write"]) == 0 and settings_docs.main(["--check"]) == 0
