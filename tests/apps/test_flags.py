"""Flags generated from the config fields: types, choices, bools, nested fields, per-command defaults,
and parsed flags back into a validated config."""

import argparse
import os

import pytest

from cogenesis.apps.flags import COMMANDS, LOCUST, NAMES, PKT, ConfigFlags, Flag, argument, flag
from cogenesis.core.config import CloudConfig, EdgeConfig, field_info
from cogenesis.core.errors import ConfigError


def parse(flags: ConfigFlags, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    flags.add_to(parser)
    return parser.parse_args(argv)


def test_established_names_and_the_dashed_rule():
    assert flag("edge.top_k").name == "--top-k"
    assert flag("edge.sketch.repetition_penalty").name == "--sketch-repetition-penalty"  # nested: model name first
    assert flag("edge.fusion.weight").name == "--fusion-weight"
    assert flag("edge.sampling.temperature").name == "--temperature"  # established exceptions
    assert flag("edge.fusion.alpha").name == "--contrast-alpha"
    assert flag("cloud.num_replicas").name == "--replicas"
    assert flag("edge.max_prompt_tokens").name == "--edge-prompt-tokens"
    for path in (*NAMES, *(p for cf in (*COMMANDS, LOCUST) for f in cf.flags for p in f.paths)):
        assert field_info(path).description  # every flag names a real, documented field


def test_types_defaults_and_help_come_from_the_field():
    top_k = argument(flag("edge.top_k"), "demo")
    assert top_k == {"type": int, "default": 10, "help": "Top-k the cloud returns per logits step."}
    assert argument(flag("edge.step_timeout_s"), "demo")["type"] is float
    assert argument(flag("edge.sampling.seed"), "demo")["type"] is int  # int | None -> int
    assert argument(flag("cloud.audit_log"), "demo") == {
        "type": str,
        "default": None,
        "help": field_info("cloud.audit_log").description,
    }


def test_literals_become_choices():
    kwargs = argument(flag("edge.fusion.method"), "demo")
    assert kwargs["choices"] == ["constant", "entropy", "contrast", "learned"] and "type" not in kwargs
    args = parse(ConfigFlags("demo", ("edge.fusion.method",)), "--fusion", "entropy")
    assert args.fusion == "entropy"
    with pytest.raises(SystemExit):
        parse(ConfigFlags("demo", ("edge.fusion.method",)), "--fusion", "average")


def test_bools_get_a_flag_and_its_negation():
    flags = ConfigFlags("demo", ("edge.ignore_eos",))
    assert argument(flag("edge.ignore_eos"), "demo")["action"] is argparse.BooleanOptionalAction
    assert flags.config(parse(flags), EdgeConfig).ignore_eos is False
    assert flags.config(parse(flags, "--ignore-eos"), EdgeConfig).ignore_eos is True
    assert flags.config(parse(flags, "--ignore-eos", "--no-ignore-eos"), EdgeConfig).ignore_eos is False


def test_nested_fields_round_trip_into_their_models():
    flags = ConfigFlags("demo", ("edge.sampling.temperature", "edge.sketch.top_p", "edge.fusion.alpha", "edge.top_k"))
    args = parse(flags, "--temperature", "0", "--sketch-top-p", "0.5", "--contrast-alpha", "2", "--top-k", "7")
    cfg = flags.config(args, EdgeConfig)
    assert cfg == EdgeConfig(
        top_k=7, sampling={"temperature": 0.0}, sketch={"top_p": 0.5}, fusion={"alpha": 2.0}
    )  # every other field keeps its default


def test_the_command_default_is_the_flag_default():
    flags = ConfigFlags("edge", ("edge.max_new_tokens", "edge.top_k"))
    args = parse(flags)
    assert (args.max_new_tokens, args.top_k) == (32, 10)
    assert flags.config(args, EdgeConfig).max_new_tokens == 32
    eval_flags = ConfigFlags("eval", ("edge.max_new_tokens",))
    assert parse(eval_flags).max_new_tokens == 128
    assert eval_flags.config(parse(eval_flags, "--max-new-tokens", "5"), EdgeConfig).max_new_tokens == 5


def test_command_defaults_without_a_flag_still_apply():
    """`cogenesis loadtest` takes only --max-new-tokens; its config still has the loadtest step timeout."""
    flags = ConfigFlags("loadtest", ("edge.max_new_tokens",))
    cfg = flags.config(parse(flags, "--max-new-tokens", "6"), EdgeConfig)
    assert (cfg.max_new_tokens, cfg.step_timeout_s, cfg.max_prompt_tokens) == (6, 120.0, 512)


def test_machine_defaults_are_computed():
    flags = ConfigFlags("up", ("cloud.torch_threads",))
    assert parse(flags).threads == max(1, (os.cpu_count() or 2) // 2)


def test_a_section_takes_only_its_own_fields():
    flags = ConfigFlags("demo", ("cloud.num_replicas", "edge.top_k"))
    args = parse(flags, "--replicas", "3", "--top-k", "5")
    assert flags.config(args, CloudConfig).num_replicas == 3 and flags.config(args, EdgeConfig).top_k == 5


def test_extra_values_join_the_flags():
    flags = ConfigFlags("demo", ("edge.top_k",))
    cfg = flags.config(parse(flags), EdgeConfig, {"edge.torch_threads": 3, "edge.prefill_threads": 4})
    assert (cfg.torch_threads, cfg.prefill_threads, cfg.top_k) == (3, 4, 10)


def test_pkt_sets_three_fields():
    flags = ConfigFlags("demo", ("edge.schedule.kind", PKT))
    args = parse(flags)
    assert args.pkt == "5,10,3"
    cfg = flags.config(parse(flags, "--schedule", "pkt", "--pkt", "1,2,3"), EdgeConfig)
    assert (cfg.schedule.kind, cfg.schedule.p, cfg.schedule.k, cfg.schedule.t) == ("pkt", 1, 2, 3)
    with pytest.raises(ConfigError, match="--pkt '1,2' is not 3 comma-separated values P,K,T") as err:
        flags.config(parse(flags, "--pkt", "1,2"), EdgeConfig)
    assert "--pkt 5,10,3" in (err.value.hint or "")
    with pytest.raises(ConfigError, match=r"schedule.k \(--pkt\)"):
        flags.config(parse(flags, "--pkt", "1,x,3"), EdgeConfig)


def test_bad_values_name_the_field_and_its_flag():
    flags = ConfigFlags("demo", ("edge.top_k", "edge.fusion.alpha"))
    with pytest.raises(ConfigError, match=r"top_k \(--top-k\): .*less than or equal to 50"):
        flags.config(parse(flags, "--top-k", "99"), EdgeConfig)
    with pytest.raises(ConfigError, match=r"fusion.alpha \(--contrast-alpha\)"):
        flags.config(parse(flags, "--contrast-alpha", "-1"), EdgeConfig)


def test_a_prefix_renames_every_option():
    flags = ConfigFlags("loadtest", ("edge.top_k", "edge.max_prompt_tokens"), prefix="--cg-")
    args = parse(flags, "--cg-top-k", "4")
    assert (args.cg_top_k, args.cg_edge_prompt_tokens) == (4, 512)
    with pytest.raises(ConfigError, match=r"top_k \(--cg-top-k\)"):
        flags.config(parse(flags, "--cg-top-k", "0"), EdgeConfig)


def test_a_flag_of_its_own_keeps_its_help():
    f = Flag("--threads", ("edge.torch_threads",), "threads of both")
    assert argument(f, "edge") == {"type": int, "default": 1, "help": "threads of both"}


def test_percent_signs_in_descriptions_survive_argparse(monkeypatch):
    info = field_info("edge.top_k")
    monkeypatch.setattr(info, "description", "top 10% of it")
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ConfigFlags("demo", ("edge.top_k",)).add_to(parser)
    assert "top 10% of it" in parser.format_help()
