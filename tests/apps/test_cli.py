"""The CLI explains itself and turns bad input into one clear error line (no traceback)."""

import json
import subprocess
import sys

import pytest

from cogenesis.apps.cli import main


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


def test_up_validates_its_flags(capsys, tmp_path):
    assert main(["up", "--state-dir", str(tmp_path), "--replicas", "0"]) == 2
    assert "num_replicas" in capsys.readouterr().err


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
