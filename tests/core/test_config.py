"""Unit tests for cogenesis.core.config: validated configuration and YAML loading."""

from __future__ import annotations

import pydantic
import pytest

from cogenesis.core.config import (
    COMMAND_DEFAULTS,
    HALF_THE_CORES,
    CloudConfig,
    EdgeConfig,
    FusionConfig,
    SamplingConfig,
    command_config,
    command_default,
    field_info,
    field_paths,
    load_yaml,
    validate,
)
from cogenesis.core.errors import ConfigError
from cogenesis.core.protocol import MAX_TOP_K


def test_defaults_are_valid_and_sensible():
    edge, cloud = EdgeConfig(), CloudConfig()
    assert 1 <= edge.top_k <= MAX_TOP_K
    assert edge.sampling == SamplingConfig()
    assert edge.fusion == FusionConfig()
    assert 0.0 <= edge.fusion.weight <= 1.0 and edge.fusion.floor <= 0.0
    assert 0.0 < edge.sampling.top_p <= 1.0 and edge.sampling.temperature >= 0.0
    assert cloud.num_replicas >= 1 and cloud.sketch_style in ("zero-shot", "paper")
    # every default survives a dump -> validate round trip
    assert validate(EdgeConfig, edge.model_dump()) == edge
    assert validate(CloudConfig, cloud.model_dump()) == cloud


def test_validate_empty_dict_gives_defaults():
    assert validate(EdgeConfig, {}) == EdgeConfig()
    assert validate(CloudConfig, {}) == CloudConfig()


def test_validate_accepts_good_values_nested():
    cfg = validate(
        EdgeConfig,
        {"top_k": MAX_TOP_K, "sampling": {"temperature": 0.0, "seed": None}, "fusion": {"weight": 1.0, "floor": -5.0}},
    )
    assert cfg.top_k == MAX_TOP_K
    assert cfg.sampling.temperature == 0.0 and cfg.sampling.seed is None
    assert cfg.sampling.top_p == 0.9  # untouched nested default
    assert cfg.fusion.weight == 1.0 and cfg.fusion.floor == -5.0


@pytest.mark.parametrize(
    "model,raw,field",
    [
        (EdgeConfig, {"top_k": 0}, "top_k"),
        (EdgeConfig, {"top_k": MAX_TOP_K + 1}, "top_k"),
        (EdgeConfig, {"max_new_tokens": 0}, "max_new_tokens"),
        (EdgeConfig, {"step_timeout_s": 0}, "step_timeout_s"),
        (EdgeConfig, {"top_k": "many"}, "top_k"),
        (EdgeConfig, {"sampling": {"temperature": -0.1}}, "sampling.temperature"),
        (EdgeConfig, {"sampling": {"top_p": 0.0}}, "sampling.top_p"),
        (EdgeConfig, {"sampling": {"top_p": 1.5}}, "sampling.top_p"),
        (EdgeConfig, {"fusion": {"weight": 1.5}}, "fusion.weight"),
        (EdgeConfig, {"fusion": {"floor": 1.0}}, "fusion.floor"),
        (EdgeConfig, {"fusion": {"method": "average"}}, "fusion.method"),
        (EdgeConfig, {"fusion": {"method": "learned"}}, "fusion"),
        (EdgeConfig, {"fusion": {"alpha": -1.0}}, "fusion.alpha"),
        (EdgeConfig, {"sketch": {"temperature": -1.0}}, "sketch.temperature"),
        (EdgeConfig, {"sketch": {"top_p": 0.0}}, "sketch.top_p"),
        (EdgeConfig, {"sketch": {"repetition_penalty": 0.0}}, "sketch.repetition_penalty"),
        (CloudConfig, {"num_replicas": 0}, "num_replicas"),
        (CloudConfig, {"http_port": 70000}, "http_port"),
        (CloudConfig, {"sketch_style": "few-shot"}, "sketch_style"),
        (CloudConfig, {"replica_cpus": 0}, "replica_cpus"),
    ],
)
def test_bad_values_raise_config_error_naming_field(model, raw, field):
    with pytest.raises(ConfigError) as info:
        validate(model, raw)
    assert f"{field}:" in info.value.message
    assert model.__name__ in info.value.message
    assert info.value.hint and model.__name__ in info.value.hint


@pytest.mark.parametrize(
    "model,raw,field",
    [
        (EdgeConfig, {"topk": 5}, "topk"),
        (CloudConfig, {"replicas": 2}, "replicas"),
        (EdgeConfig, {"sampling": {"temp": 0.5}}, "sampling.temp"),
        (EdgeConfig, {"fusion": {"beta": 0.5}}, "fusion.beta"),
    ],
)
def test_unknown_keys_raise_config_error_naming_field(model, raw, field):
    with pytest.raises(ConfigError, match=rf"{field}: Extra inputs are not permitted"):
        validate(model, raw)


def test_several_problems_are_all_named():
    with pytest.raises(ConfigError) as info:
        validate(EdgeConfig, {"top_k": 0, "bogus": 1, "sampling": {"top_p": 2}})
    msg = info.value.message
    assert "top_k:" in msg and "bogus:" in msg and "sampling.top_p:" in msg


def test_validate_names_where():
    with pytest.raises(ConfigError, match="in my-edge.yaml"):
        validate(EdgeConfig, {"top_k": -3}, "my-edge.yaml")


def test_non_mapping_is_a_root_error():
    with pytest.raises(ConfigError, match="<root>"):
        validate(CloudConfig, [1, 2])


def test_validate_never_leaks_pydantic_error():
    try:
        validate(EdgeConfig, {"top_k": 0})
    except ConfigError as exc:
        assert not isinstance(exc, pydantic.ValidationError)
        assert exc.__suppress_context__  # raised "from None": no chained traceback for the CLI
    else:  # pragma: no cover
        pytest.fail("no ConfigError")


def test_configs_are_frozen():
    cfg = EdgeConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.top_k = 3  # type: ignore[misc]


# ---- load_yaml ----------------------------------------------------------------------------------


def test_load_yaml_reads_file(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text("top_k: 5\nmax_new_tokens: 12\nsampling:\n  temperature: 0.0\nfusion:\n  weight: 0.25\n")
    cfg = load_yaml(path, EdgeConfig)
    assert isinstance(cfg, EdgeConfig)
    assert (cfg.top_k, cfg.max_new_tokens, cfg.sampling.temperature, cfg.fusion.weight) == (5, 12, 0.0, 0.25)
    assert cfg.small_model == EdgeConfig().small_model


def test_load_yaml_accepts_str_path(tmp_path):
    path = tmp_path / "cloud.yaml"
    path.write_text("num_replicas: 3\nsketch_style: paper\n")
    cfg = load_yaml(str(path), CloudConfig)
    assert cfg.num_replicas == 3 and cfg.sketch_style == "paper"


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_yaml(path, CloudConfig) == CloudConfig()


def test_load_yaml_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_yaml(missing, EdgeConfig)
    assert str(missing) in info.value.message


def test_load_yaml_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path, EdgeConfig)


@pytest.mark.parametrize("text", ["top_k: [1, 2\n", "a: b: c\n", "key: 'unterminated\n", "\tbad: indent\n"])
def test_load_yaml_invalid_yaml(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_yaml(path, EdgeConfig)
    assert str(path) in info.value.message


def test_load_yaml_bad_value_names_file_and_field(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_text("sampling:\n  top_p: 0\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path, EdgeConfig)
    assert "sampling.top_p:" in info.value.message and str(path) in info.value.message


def test_load_yaml_unknown_key(tmp_path):
    path = tmp_path / "cloud.yaml"
    path.write_text("num_replicas: 2\nnum_replica: 3\n")
    with pytest.raises(ConfigError, match="num_replica: Extra inputs"):
        load_yaml(path, CloudConfig)


def test_load_yaml_list_document(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- top_k: 3\n")
    with pytest.raises(ConfigError, match="<root>"):
        load_yaml(path, EdgeConfig)


# ---- per-command defaults -------------------------------------------------------------------------


def test_field_paths_expand_nested_models():
    edge = field_paths("edge")
    assert "edge.top_k" in edge and "edge.sampling.seed" in edge and "edge.schedule.tau" in edge
    assert "edge.sampling" not in edge and len(edge) == len(set(edge))
    assert field_paths("cloud")[0] == "cloud.large_model"
    for path in (*edge, *field_paths("cloud")):
        assert field_info(path).description, f"{path} has no description"


def test_field_info_refuses_a_path_through_a_plain_field():
    with pytest.raises(KeyError):
        field_info("edge.top_k.x")


def test_every_command_default_names_a_field_and_differs_from_it():
    for command, overrides in COMMAND_DEFAULTS.items():
        for path, value in overrides.items():
            assert value != field_info(path).default, f"{command}: {path} repeats the field's default"
        command_config(EdgeConfig, command)  # each command's configs validate
        command_config(CloudConfig, command)


def test_command_default_is_the_override_else_the_field():
    assert command_default("edge", "edge.max_new_tokens") == 32
    assert command_default("eval", "edge.max_new_tokens") == 128
    assert command_default("demo", "edge.max_new_tokens") == EdgeConfig().max_new_tokens == 64
    assert command_default("loadtest", "edge.step_timeout_s") == 120.0
    assert command_default("edge", "edge.step_timeout_s") == 60.0
    assert command_default("up", "cloud.kv_budget_mb") == 4096 and CloudConfig().kv_budget_mb == 2048
    assert command_default("up", "cloud.torch_threads") == HALF_THE_CORES.compute() >= 1
    assert str(HALF_THE_CORES) == "half the CPU cores"


def test_command_config_applies_overrides_then_values():
    cfg = command_config(EdgeConfig, "edge", {"edge.top_k": 3, "edge.sampling.seed": 7, "cloud.num_replicas": 2})
    assert (cfg.max_new_tokens, cfg.step_timeout_s, cfg.top_k, cfg.sampling.seed) == (32, 60.0, 3, 7)
    assert cfg.sampling.temperature == 0.7  # untouched nested default
    assert command_config(EdgeConfig, "demo") == EdgeConfig()
    up = command_config(CloudConfig, "up", {"cloud.max_sessions": 8})
    assert (up.max_sessions, up.kv_budget_mb, up.max_ongoing_requests) == (8, 4096, 1024)


def test_command_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"invalid EdgeConfig in flags: top_k \(--top-k\): ") as info:
        command_config(EdgeConfig, "edge", {"edge.top_k": 0}, labels={"top_k": "--top-k"})
    assert "cogenesis config" in (info.value.hint or "")


def test_labels_only_decorate_their_fields():
    with pytest.raises(ConfigError) as info:
        validate(EdgeConfig, {"top_k": 0, "lookahead": -1}, "flags", {"lookahead": "--lookahead"})
    assert "top_k: " in info.value.message and "lookahead (--lookahead): " in info.value.message
