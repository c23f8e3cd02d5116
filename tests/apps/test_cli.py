"""The CLI explains itself and turns bad input into one clear error line (no traceback)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cogenesis.apps.cli import build_parser, main
from cogenesis.apps.flags import DEMO, EDGE, EVAL, LOADTEST, UP
from cogenesis.core.config import CloudConfig, EdgeConfig, command_config


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "cogenesis.apps.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_commands_and_demo_flags():
    top = run_cli("--help")
    assert top.returncode == 0 and "demo" in top.stdout and "models" in top.stdout
    demo = run_cli("demo", "--help")
    for flag in ("--clients", "--mode", "--max-new-tokens", "--data", "--redis-url", "--json", "--audit-log"):
        assert flag in demo.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"a": 1}', "non-empty JSON list"),
        ('[{"tid": "x"}]', "missing field 'conversations'"),
        ('[{"conversations": [{"from": "user", "value": "Write: something"}]}]', "no private context"),
    ],
)
def test_bad_data_file_is_a_clear_error(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["demo", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and "hint:" in err and "Traceback" not in err


def test_missing_data_file(capsys, tmp_path):
    assert main(["demo", "--data", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "99"], "top_k"),
        (["--clients", "0"], "--clients must be at least 1"),
        (["--temperature", "-1"], "temperature"),
        (["--fusion-weight", "1.5"], "weight"),
    ],
)
def test_bad_flags_are_clear_errors(capsys, flags, message):
    assert main(["demo", *flags]) == 2
    assert message in capsys.readouterr().err


def test_config_reference_documents_every_field(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "top_k = 10  # Top-k the cloud returns per logits step." in out
    assert "large_model = 'embedded:large'" in out
    assert (
        "max_new_tokens = 64  # Tokens each client generates per session.  "
        "[int in [1, 4096]; --max-new-tokens; edge: 32, loadtest: 32, eval: 128]"
    ) in out
    assert "torch_threads = 2  # torch intra-op threads per replica.  [int in [1, 256]; --threads; up: half the" in out
    assert (
        "  sampling.seed = 0  # " in out
        and "  schedule.p = 5  # pkt: fuse the first P steps.  [int >= 0; --pkt]" in out
    )


def test_readme_config_table_is_the_generated_one(capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- config-table:start -->\n")[1].split("<!-- config-table:end -->")[0]
    assert main(["config", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == block, (
        "README's configuration table is stale: paste `cogenesis config --markdown` between its markers"
    )
    assert "| `edge.max_new_tokens` | int in [1, 4096] | `64` | edge: `32`, loadtest: `32`, eval: `128` |" in out
    assert "| `edge.schedule.kind` | every / pkt / uncertainty | `every` |  | `--schedule` |" in out


HALF = max(1, (os.cpu_count() or 2) // 2)
MODELS = {"large_model": "embedded:large", "small_model": "embedded:small"}
FUSION = {"fusion": "constant", "fusion_weight": 0.5, "contrast_alpha": 1.0, "fusion_checkpoint": None}
SCHEDULE = {"schedule": "every", "pkt": "5,10,3", "tau": 2.0}
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "seed": 0}
# What every config flag defaulted to before the flags were generated from the config (cli.py before issue 12).
DEFAULTS_BEFORE = {
    ("demo",): {
        "max_new_tokens": 64,
        "audit_log": None,
        **MODELS,
        "replicas": 1,
        "top_k": 10,
        "lookahead": 0,
        **SCHEDULE,
        **FUSION,
        **SAMPLING,
        "sketch_style": "zero-shot",
        "sketch_temperature": 0.0,
        "sketch_top_p": 1.0,
        "sketch_repetition_penalty": 1.3,
        "sketch_max_tokens": 160,
        "step_timeout": 30.0,
    },
    ("bench", "exchange"): {
        "max_new_tokens": 64,
        "lookahead": 4,
        "top_k": 10,
        "edge_prompt_tokens": 512,
        **MODELS,
        "threads": HALF,
    },
    ("up",): {
        "large_model": "embedded:large",
        "replicas": 1,
        "threads": HALF,
        "kv_budget_mb": 4096,
        "max_sessions": 4096,
        "max_ongoing_requests": 1024,
        "http_port": 8000,
    },
    ("edge",): {
        "max_new_tokens": 32,
        "sketch_max_tokens": 64,
        "top_k": 10,
        "lookahead": 0,
        **FUSION,
        "edge_prompt_tokens": 512,
        "small_model": "embedded:small",
        "threads": 1,
        "step_timeout": 60.0,
    },
    ("loadtest",): {"max_new_tokens": 32},
    ("train-fusion",): {"top_k": 10, "max_gold_tokens": 384, "edge_prompt_tokens": 1536, **MODELS},
    ("eval",): {
        "fusion_checkpoint": None,
        "fusion_weight": 0.5,
        "contrast_alpha": 1.0,
        **SCHEDULE,
        "top_k": 10,
        "max_new_tokens": 128,
        **SAMPLING,
        "max_gold_tokens": 384,
        "edge_prompt_tokens": 1536,
        **MODELS,
    },
}
REQUIRED = {("train-fusion",): ["--data", "x.json"], ("eval",): ["--data", "x.json"]}


@pytest.mark.parametrize("command", DEFAULTS_BEFORE, ids=" ".join)
def test_every_command_keeps_its_defaults(command):
    args = build_parser().parse_args([*command, *REQUIRED.get(command, [])])
    before = DEFAULTS_BEFORE[command]
    now = {dest: getattr(args, dest) for dest in before}
    assert now == before
    assert {k: type(v) for k, v in now.items()} == {k: type(v) for k, v in before.items()}


@pytest.mark.parametrize("command", DEFAULTS_BEFORE, ids=" ".join)
def test_help_shows_each_commands_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag: no wrapping inside a default
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for dest, default in DEFAULTS_BEFORE[command].items():
        flag = "--" + dest.replace("_", "-")
        shown = re.search(rf" {flag} (?:[A-Z_,]+|{{[^}}]*}}) .*?\(default: (.*?)\)", text)
        assert shown and shown.group(1) == str(default), (flag, shown and shown.group(1))


def test_configs_equal_the_ones_the_commands_built_before():
    parse = build_parser().parse_args
    fusion = {"method": "constant", "weight": 0.5, "alpha": 1.0, "checkpoint": None}
    assert EDGE.config(parse(["edge"]), EdgeConfig) == EdgeConfig(
        max_new_tokens=32,
        sketch_max_tokens=64,
        max_prompt_tokens=512,
        torch_threads=1,
        step_timeout_s=60.0,
        fusion=fusion,
    )
    up = CloudConfig(torch_threads=HALF, kv_budget_mb=4096, max_sessions=4096, max_ongoing_requests=1024)
    assert UP.config(parse(["up"]), CloudConfig) == up == command_config(CloudConfig, "up")
    demo = parse(["demo"])
    assert DEMO.config(demo, CloudConfig, {"cloud.torch_threads": 1}) == CloudConfig(torch_threads=1)
    assert DEMO.config(demo, EdgeConfig, {"edge.prefill_threads": 2}) == EdgeConfig(
        prefill_threads=2, schedule={"kind": "every", "p": 5, "k": 10, "t": 3, "tau": 2.0}, fusion=fusion
    )
    assert LOADTEST.config(parse(["loadtest"]), EdgeConfig).max_new_tokens == 32
    assert EVAL.config(parse(["eval", "--data", "x.json"]), EdgeConfig) == EdgeConfig(max_new_tokens=128)


def test_unknown_model_is_a_clear_error(capsys, tmp_path):
    data = tmp_path / "d.json"
    from cogenesis.core.data import sample_data_path

    data.write_text(json.dumps(json.loads(sample_data_path().read_text())[:1]))
    assert main(["demo", "--data", str(data), "--small-model", "embedded:tiny"]) == 2
    assert "unknown embedded model" in capsys.readouterr().err


def test_help_lists_the_cluster_and_load_commands():
    top = run_cli("--help")
    for cmd in ("up", "down", "status", "edge", "loadtest"):
        assert cmd in top.stdout
    edge = run_cli("edge", "--help")
    for flag in (
        "--clients",
        "--mode",
        "--duration",
        "--sessions-per-client",
        "--think-time",
        "--pools",
        "--device",
        "--json",
    ):
        assert flag in edge.stdout
    assert "configs/devices.yaml" in edge.stdout


def test_cluster_commands_without_a_cluster(capsys, tmp_path):
    assert main(["status", "--state-dir", str(tmp_path)]) == 1
    assert "no cluster running" in capsys.readouterr().out
    assert main(["down", "--state-dir", str(tmp_path)]) == 0
    assert "no cluster was running" in capsys.readouterr().out
    assert main(["edge", "--state-dir", str(tmp_path), "--clients", "3"]) == 2
    err = capsys.readouterr().err
    assert "no cluster is running" in err and "cogenesis up" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "toaster"], "unknown device 'toaster'"),
        (["--run-time", "soon"], "is not a duration"),
        (["--users", "0"], "--users must be >= 1"),
        (["--think-time", "9..1"], "needs 0 <= A <= B"),
        (["--shape", "configs/loadtest/zigzag.yaml"], "does not exist"),
    ],
)
def test_loadtest_refuses_bad_input_before_starting_anything(capsys, tmp_path, flags, message):
    assert main(["loadtest", "--state-dir", str(tmp_path), "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "state.json").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--replicas", "0"], "num_replicas"),
        (["--nodes", "0"], "--nodes must be 1..16"),
        (["--autoscale", "1"], "is not MIN,MAX"),
        (["--autoscale", "3,2"], "min_replicas (3) is above max_replicas (2)"),
        (["--target-sessions", "8"], "--target-sessions needs --autoscale"),
        (["--autoscale", "1,2", "--target-sessions", "0"], "target_sessions"),
    ],
)
def test_up_validates_its_flags(capsys, tmp_path, flags, message):
    assert main(["up", "--state-dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "state.json").exists()


def test_up_turns_its_scaling_flags_into_the_config():
    import argparse

    from cogenesis.apps.commands.cluster import _autoscale

    args = argparse.Namespace(autoscale="1,4", target_sessions=16.0)
    assert _autoscale(args) == {
        "cloud.autoscaling.min_replicas": 1,
        "cloud.autoscaling.max_replicas": 4,
        "cloud.autoscaling.target_sessions": 16.0,
    }
    assert _autoscale(argparse.Namespace(autoscale=None, target_sessions=None)) == {}


def test_a_cluster_named_by_url_that_does_not_answer_says_so(capsys, tmp_path):
    assert main(["status", "--redis-url", "redis://127.0.0.1:9/0", "--state-dir", str(tmp_path)]) == 1
    assert "does not answer: cannot reach Redis" in capsys.readouterr().out
    assert main(["status", "--http-url", "http://127.0.0.1:9/cloud", "--state-dir", str(tmp_path)]) == 2
    assert "--http-url needs --redis-url" in capsys.readouterr().err


def test_top_and_dashboard_errors(capsys, tmp_path, redis_url):
    assert main(["top", "--state-dir", str(tmp_path), "--once"]) == 2
    assert "no cluster is running" in capsys.readouterr().err
    assert main(["top", "--redis-url", redis_url, "--once"]) == 2
    assert "no metrics endpoint is announced" in capsys.readouterr().err
    assert main(["top", "--redis-url", redis_url, "--interval", "0"]) == 2
    assert main(["dashboard", "--prometheus", "http://127.0.0.1:9", "--out", str(tmp_path / "d.png")]) == 2
    assert "cannot query Prometheus" in capsys.readouterr().err


def test_help_explains_train_fusion_and_eval():
    for cmd, flags in (
        ("train-fusion", ("--data", "--variant", "--top-k", "--patience", "--out")),
        ("eval", ("--data", "--limit", "--fusions", "--fusion-checkpoint", "--json", "--judge-url", "--schedule")),
    ):
        out = run_cli(cmd, "--help")
        assert out.returncode == 0 and all(f in out.stdout for f in flags), cmd
    demo = run_cli("demo", "--help").stdout
    assert "--fusion {constant,entropy,contrast,learned}" in demo and "--fusion-checkpoint" in demo


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--fusion", "learned"], "needs a checkpoint"),
        (["demo", "--fusion", "contrast", "--contrast-alpha", "-1"], "fusion.alpha"),
        (["eval", "--data", "x.json", "--fusions", "constant,avg"], "unknown fusion method(s) avg"),
        (["eval", "--data", "x.json", "--fusions", "learned"], "--fusion-checkpoint"),
        (["eval", "--data", "x.json", "--limit", "0"], "--limit"),
        (["eval", "--data", "nope.json"], "does not exist"),
        (["train-fusion", "--data", "x.json", "--variant", "compact", "--dev-fraction", "0"], "--dev-fraction"),
        (["train-fusion", "--data", "nope.json"], "does not exist"),
        (["train-fusion", "--data", "x.json", "--top-k", "99"], "--top-k"),
    ],
)
def test_fusion_and_eval_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_fusion_then_eval_with_it(tiny_large, tiny_small, tmp_path):
    from cogenesis.core.data import sample_data_path

    models = ["--large-model", str(tiny_large), "--small-model", str(tiny_small)]
    ckpt = tmp_path / "fusion.pt"
    out = run_cli(
        "train-fusion",
        "--data",
        str(sample_data_path()),
        "--limit",
        "3",
        "--top-k",
        "5",
        "--epochs",
        "4",
        "--max-gold-tokens",
        "16",
        "--edge-prompt-tokens",
        "256",
        "--out",
        str(ckpt),
        *models,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "--fusion learned --fusion-checkpoint" in out.stdout and ckpt.is_file()
    summary = json.loads(ckpt.with_suffix(".json").read_text())
    assert summary["records"] == 3 and len(summary["history"]) >= 2 and "constant_w0.5" in summary["dev_baselines"]
    report = tmp_path / "eval.json"
    out = run_cli(
        "eval",
        "--data",
        str(sample_data_path()),
        "--limit",
        "2",
        "--top-k",
        "5",
        "--max-new-tokens",
        "3",
        "--max-gold-tokens",
        "8",
        "--edge-prompt-tokens",
        "256",
        "--fusions",
        "constant,learned",
        "--fusion-checkpoint",
        str(ckpt),
        "--json",
        str(report),
        *models,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "logits_learned" in out.stdout and "ROUGE-L" in out.stdout
    assert json.loads(report.read_text())["records"] == 2
    assert report.with_suffix(".md").read_text().count("\n") == 2 + 6
    assert report.with_suffix(".png").stat().st_size > 10_000
