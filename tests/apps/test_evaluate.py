"""`cogenesis eval` on tiny real models: every setting scored, the cloud's view audited, nothing private written."""

import json
import math
from pathlib import Path

import pytest

from cogenesis.apps.eval_report import markdown_table, plot
from cogenesis.apps.evaluate import BASE_SETTINGS, SPAN_POLICIES, EvalOptions, run_eval
from cogenesis.core.data import sample_data_path
from cogenesis.core.errors import ConfigError
from cogenesis.core.fusion_net import FusionNet, save


@pytest.fixture(scope="module")
def report(tiny_large, tiny_small, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    ckpt = save(FusionNet("compact", k=5, hidden=8), tmp / "fusion.pt")
    opts = EvalOptions(
        data=str(sample_data_path()),
        limit=3,
        fusions=("constant", "entropy", "contrast", "learned"),
        fusion_checkpoint=str(ckpt),
        top_k=5,
        max_new_tokens=6,
        max_gold_tokens=12,
        edge_prompt_tokens=256,
        batch=2,
        large_model=str(tiny_large),
        small_model=str(tiny_small),
        outputs_path=str(tmp / "outputs.jsonl"),
    )
    stages = []
    out = run_eval(opts, lambda s, d, n: stages.append((s, d, n)))
    return out, opts, stages, tmp


def test_every_setting_is_scored(report):
    out, opts, stages, _ = report
    names = [r["setting"] for r in out["settings"]]
    assert names == list(BASE_SETTINGS) + ["logits_constant", "logits_entropy", "logits_contrast", "logits_learned"]
    assert out["records"] == 3
    for row in out["settings"]:
        assert math.isfinite(row["nll_per_token"]) and row["nll_per_token"] > 0, row
        assert row["perplexity"] == pytest.approx(math.exp(row["nll_per_token"]), rel=1e-3)
        assert 0.0 <= row["rouge_l"] <= 1.0 and row["failed"] == 0 and row["gold_tokens"] == 3 * 12
        if row["setting"].startswith("logits_"):
            assert 0.0 <= row["coverage"] <= 1.0
            # every step asks the cloud (schedule every), except positions the stream gate held back
            assert 0.0 <= row["held_share"] < 0.5
            assert row["round_trips_per_token"] >= 1.0 - row["held_share"] - 1e-3
    assert stages[-1][0].startswith("scoring") and stages[-1][1:] == (3, 3)


def test_fusion_methods_give_different_distributions(report):
    nll = {r["setting"]: r["nll_per_token"] for r in report[0]["settings"]}
    assert len({nll["logits_constant"], nll["logits_entropy"], nll["logits_contrast"]}) == 3


def test_exposure_is_measured_from_what_the_cloud_received(report):
    rows = {r["setting"]: r for r in report[0]["settings"]}
    assert rows["large_with_context"]["exposure"] > 0.1  # the reference: given (a 256-token budget of) the context
    for s in ("large_without_context", "small_with_context", "sketch"):
        assert rows[s]["exposure"] == 0.0, s
    for s in ("logits_constant", "logits_contrast"):
        assert rows[s]["exposure"] < 0.05, s  # public instruction + generated tokens only


def test_report_holds_no_private_text_and_outputs_are_opt_in(report, sample_records):
    out, _, _, tmp = report
    text = json.dumps(out)
    for r in sample_records[:3]:
        assert all(f not in text for f in r.private_fields() if len(f) > 20)
    lines = (tmp / "outputs.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {"tid", "sketch", "logits_learned", "sketch_outline"} <= set(json.loads(lines[0]))


def test_table_and_plot(report, tmp_path):
    out = report[0]
    table = markdown_table(out).splitlines()
    assert len(table) == 2 + len(out["settings"]) and "ROUGE-L" in table[0] and "exposure" in table[0]
    assert "judge" not in table[0]
    out = json.loads(json.dumps(out))
    out["settings"][0]["judge"] = {"overall": 7.5, "personalization": 6.0, "overall_without_profile": 8.0}
    assert "judge overall" in markdown_table(out).splitlines()[0] and "7.50" in markdown_table(out)
    path = plot(out, tmp_path / "eval.png")
    assert path.stat().st_size > 10_000


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"limit": 0}, "--limit"),
        ({"fusions": ("avg",)}, "unknown fusion"),
        ({"fusions": ("learned",)}, "--fusion-checkpoint"),
        ({"batch": 0}, "--batch"),
        ({"top_k": 0}, "top_k"),
        ({"schedule": {"kind": "sometimes"}}, "schedule.kind"),
        ({"base": ("large",)}, "unknown setting"),
        ({"base": (), "fusions": ()}, "nothing to evaluate"),
    ],
)
def test_bad_options_fail_before_loading(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvalOptions(data="x.json", **kwargs).validate()


def test_only_the_logits_settings(tiny_large, tiny_small):
    out = run_eval(
        EvalOptions(
            data=str(sample_data_path()),
            limit=2,
            base=(),
            fusions=("entropy",),
            top_k=5,
            max_new_tokens=12,
            max_gold_tokens=8,
            edge_prompt_tokens=256,
            batch=2,
            large_model=str(tiny_large),
            small_model=str(tiny_small),
            schedule={"kind": "pkt"},
        )
    )
    assert [r["setting"] for r in out["settings"]] == ["logits_entropy"]
    assert math.isfinite(out["settings"][0]["nll_per_token"]) and out["edge"]["schedule"]["kind"] == "pkt"
    assert out["settings"][0]["round_trips_per_token"] < 1.0  # pkt skips round trips


def test_paper_abstract_records(tiny_large, tiny_small, shared_data_dir):
    data = shared_data_dir / "paper_dev.json"
    out = run_eval(
        EvalOptions(
            data=str(data),
            limit=2,
            fusions=("constant",),
            top_k=5,
            max_new_tokens=3,
            max_gold_tokens=8,
            edge_prompt_tokens=1024,
            batch=2,
            large_model=str(tiny_large),
            small_model=str(tiny_small),
        )
    )  # 1024: room for some of the past abstracts
    rows = {r["setting"]: r for r in out["settings"]}
    assert out["records"] == 2 and set(rows) == {*BASE_SETTINGS, "logits_constant"}
    assert rows["large_with_context"]["exposure"] > 0.0 == rows["large_without_context"]["exposure"]
    assert all(math.isfinite(r["nll_per_token"]) for r in rows.values())


# ---- the price of privacy: --span-policies -----------------------------------------------------------------

PUBLIC_GOLD = "thank you all for reading this short note today."


def _one_record(tmp_path, name: str, index: int, gold: str | None = None) -> str:
    raw = json.loads(sample_data_path().read_text())[index]
    if gold is not None:
        raw["conversations"][1]["value"] = gold
    path = tmp_path / name
    path.write_text(json.dumps([raw]))
    return str(path)


def _priced(data: str, tiny_large, tiny_small, policies=()) -> dict:
    opts = EvalOptions(
        data=data,
        limit=1,
        base=(),
        fusions=("constant",),
        top_k=5,
        max_new_tokens=8,
        max_gold_tokens=64,
        edge_prompt_tokens=256,
        large_model=str(tiny_large),
        small_model=str(tiny_small),
        span_policies=policies,
    )
    return {r["setting"]: r for r in run_eval(opts)["settings"]}


def _gate_run(record_data: str, text: str, tokenizer_path) -> tuple[int, int]:
    """(private spans in ``text``, tokens the record's stream gate held back writing it)."""
    from transformers import AutoTokenizer

    from cogenesis.core.data import load_records
    from cogenesis.edge_sim.gate import OutboundGate

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    gate = OutboundGate.of_record(load_records(record_data)[0])
    stream = gate.stream(tok)
    for t in tok(text, add_special_tokens=False).input_ids[:64]:
        stream.push(t)
    return len(gate.spans.find(text)), stream.stats.held


def test_span_policies_report_quality_and_exposure_per_policy(tiny_large, tiny_small, tmp_path):
    data = _one_record(tmp_path, "private.json", 1)  # its gold answer names private people and places
    spans, held = _gate_run(data, json.loads(Path(data).read_text())[0]["conversations"][1]["value"], tiny_small)
    assert spans > 0 and held > 0
    plain = _priced(data, tiny_large, tiny_small)
    priced = _priced(data, tiny_large, tiny_small, SPAN_POLICIES)
    assert list(priced) == [f"logits_constant/{p}" for p in SPAN_POLICIES] and list(plain) == ["logits_constant"]
    assert "span_policy" not in plain["logits_constant"]
    for policy in SPAN_POLICIES:
        row = priced[f"logits_constant/{policy}"]
        assert row["span_policy"] == policy and row["private_spans_sent"] == 0 and row["failed"] == 0
        assert math.isfinite(row["nll_per_token"]) and 0.0 <= row["rouge_l"] <= 1.0
        assert row["nll_per_token"] != plain["logits_constant"]["nll_per_token"]  # spans written without fusion
        assert row["gold_tokens"] == plain["logits_constant"]["gold_tokens"]
    table = markdown_table({"settings": list(priced.values())})
    assert "span policy" in table and "private spans sent" in table and "| placeholder |" in table


def test_outside_private_spans_every_policy_prices_nothing(tiny_large, tiny_small, tmp_path):
    data = _one_record(tmp_path, "public.json", 0, gold=PUBLIC_GOLD)
    assert _gate_run(data, PUBLIC_GOLD, tiny_small) == (0, 0)  # nothing private, nothing held back
    plain = _priced(data, tiny_large, tiny_small)["logits_constant"]
    for row in _priced(data, tiny_large, tiny_small, SPAN_POLICIES).values():
        assert row["nll_per_token"] == pytest.approx(plain["nll_per_token"], abs=1e-4)
        assert row["coverage"] == plain["coverage"]


def test_the_plain_report_keeps_its_columns(report):
    out = report[0]
    assert not any("span_policy" in r for r in out["settings"])
    assert "span policy" not in markdown_table(out)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"span_policies": ("never",)}, "unknown span policy"), ({"span_policies": ("local",), "fusions": ()}, "fusion")],
)
def test_bad_span_policies_fail_before_loading(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvalOptions(data="x.json", **kwargs).validate()


def test_the_span_policies_flag_is_checked_before_loading(capsys):
    from cogenesis.apps.cli import main

    assert main(["eval", "--data", str(sample_data_path()), "--span-policies", "placeholder, never"]) == 2
    err = capsys.readouterr().err
    assert "unknown span policy(ies) never" in err and "placeholder, local, refuse" in err
