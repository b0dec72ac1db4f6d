"""ComputeSettings and ScoreKey: one typed form, validated once where the config is read."""

from __future__ import annotations

import pytest

from msif_assets.config import ConfigError, MsifConfig, load_config
from msif_assets.engine import Damping
from msif_assets.pipeline.settings import ALL_METHODS, ComputeSettings, ScoreKey, SettingsError


def test_config_values_round_trip_to_an_equal_settings_object():
    settings = ComputeSettings.from_config({"dampings": ["abs:1e-3", "rel:0.5"], "methods": ["ms-if", "gdp"], "batch_size": 3})
    assert settings.dampings == (Damping("absolute", 1e-3), Damping("relative", 0.5))
    assert ComputeSettings.from_config(settings.to_config()) == settings
    assert ComputeSettings.from_config(ComputeSettings().to_config()) == ComputeSettings()


@pytest.mark.parametrize(("raw", "named"), [
    ({"dampings": ["abs:inf"]}, "dampings"),
    ({"dampings": ["abs:-1"]}, "dampings"),
    ({"dampings": ["0.1"]}, "rel:<alpha>"),
    ({"dampings": "rel:0.1"}, "list of strings"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"batch_size": "8"}, "batch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"split_heads": 1}, "split_heads"),
    ({"methods": ["ms-if", "tracin"]}, "methods"),
    ({"labels": "true"}, "labels"),
    ({"stats_dtype": "fp8"}, "stats_dtype"),
    ({"knn": 3}, "unknown key"),
])
def test_a_bad_value_is_an_error_naming_the_key(raw, named):
    with pytest.raises(SettingsError, match=named):
        ComputeSettings.from_config(raw)


def test_msif_toml_is_validated_when_read_naming_file_and_key(tmp_path):
    path = tmp_path / "msif.toml"
    path.write_text('[compute]\ndampings = ["abs:1e-3", "abs:nope"]\n')
    with pytest.raises(ConfigError, match=r"msif\.toml: \[compute\]: dampings"):
        load_config(path)
    path.write_text('[lake]\nroot = "x"\nroots = "y"\n')
    with pytest.raises(ConfigError, match=r"\[lake\] unknown key\(s\) \['roots'\]"):
        load_config(path)
    path.write_text('[compute]\ndampings = ["abs:1e-3"]\n')
    assert load_config(path).compute.dampings == (Damping("absolute", 1e-3),)


def test_the_default_world_layers_its_defaults_under_the_users_values():
    config = MsifConfig(compute={"batch_size": 2})
    assert config.compute.batch_size == 2 and len(config.compute.dampings) == 5  # the demo's damping grid
    assert MsifConfig(inputs={"inbox": "x"}, compute={}).compute == ComputeSettings()


def test_score_keys_cover_every_method_and_damping_once():
    settings = ComputeSettings.from_config({"dampings": ["rel:0.1", "abs:0.001"]})
    labels = [k.label for k in settings.score_keys]
    assert labels == ["ms-if@rel:0.1", "ms-if@abs:0.001", "ss-if@rel:0.1", "ss-if@abs:0.001", "gdp", "repsim", "bm25"]
    assert [k.method for k in settings.gradient_keys] == ["ms-if", "ms-if", "ss-if", "ss-if", "gdp"]
    assert {k.method for k in settings.score_keys} == set(ALL_METHODS)


def test_score_key_columns_tag_and_label():
    key = ScoreKey("ms-if", Damping("absolute", 1e-4))
    assert key.columns == {"method": "ms-if", "damping_kind": "absolute", "damping": 1e-4}
    assert (key.tag, key.label, key.damping_label) == ("abs-0.0001", "ms-if@abs:0.0001", "abs:0.0001")
    assert ScoreKey.from_columns(**key.columns) == key
    assert ScoreKey.from_columns("bm25", None, None) == ScoreKey("bm25")
    assert (ScoreKey("gdp").tag, ScoreKey("gdp").damping_label) == ("none", "—")
    with pytest.raises(ValueError):
        ScoreKey("gdp", Damping())
    with pytest.raises(ValueError):
        ScoreKey("ss-if")
