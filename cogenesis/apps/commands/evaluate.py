"""``cogenesis eval``: the paper's Table 1 on any model pair (NLL, ROUGE-L, privacy exposure per setting)."""

from __future__ import annotations

import argparse
import os

from cogenesis.apps.commands.common import add_gold_tokens_flag
from cogenesis.apps.flags import EVAL


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="the paper's Table 1 on any model pair: NLL, ROUGE-L and privacy exposure per setting",
        description=(
            "Run large_with_context (reference; the context is not private there), large_without_context, "
            "small_with_context, sketch and logits (one per --fusions method) on CoGenesis records, with the "
            "real cloud engine in-process. Per setting: teacher-forced NLL/token of the gold answer under the "
            "setting's own distribution, ROUGE-L of the generated answer, its length, and exposure (share of "
            "the record's private 4-grams in what the cloud model received). Writes --json, a markdown table "
            "(.md) and a bar chart (.png) beside it. With --judge-url, also the paper's three GPT-4-judge "
            "ratings from any OpenAI-compatible endpoint (the judge sees the profile and history, as in the "
            "paper: use an endpoint you trust with them). With --span-policies, each logits setting runs under "
            "each span policy of the device's stream gate on the same records: the price of privacy, as quality "
            "(NLL, ROUGE-L) beside the private spans the small model wrote and the token stream sent."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="CoGenesis JSON (context_aware_*.json or paper_*.json)")
    p.add_argument("--limit", type=int, default=20, help="records to evaluate (the first N with a gold answer)")
    p.add_argument(
        "--settings",
        default="large_with_context,large_without_context,small_with_context,sketch",
        help="comma-separated non-logits settings to run ('none': only the --fusions settings)",
    )
    p.add_argument(
        "--fusions",
        default="constant,entropy,contrast",
        help="comma-separated logits fusion methods (add 'learned' with --fusion-checkpoint)",
    )
    p.add_argument(
        "--span-policies",
        default=None,
        help="the price of privacy: run each logits setting under each of these comma-separated span policies "
        "(placeholder,local,refuse) on the same records, and report the private spans the small model wrote "
        "and the token stream sent, with NLL and ROUGE-L per policy (default: only --span-policy)",
    )
    p.add_argument("--batch", type=int, default=8, help="records generated together")
    add_gold_tokens_flag(p)
    p.add_argument("--json", dest="json_path", default="out/eval.json", help="report path (.md and .png beside it)")
    p.add_argument(
        "--outputs",
        default=None,
        help="also write every generated answer here (JSONL; device-side output: may repeat private details)",
    )
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (…/v1) of a judge model")
    p.add_argument("--judge-model", default="gpt-4-1106-preview", help="judge model name (the paper's)")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key")
    EVAL.add_to(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from cogenesis.apps.commands.common import progress_bar, write_json
    from cogenesis.apps.eval_report import markdown_table, plot
    from cogenesis.apps.evaluate import EvalOptions, run_eval
    from cogenesis.core.config import CloudConfig, EdgeConfig

    edge, cloud = EVAL.config(args, EdgeConfig), EVAL.config(args, CloudConfig)
    fusions = tuple(m.strip() for m in args.fusions.split(",") if m.strip())
    policies = tuple(p.strip() for p in (args.span_policies or "").split(",") if p.strip())
    base = () if args.settings.strip() == "none" else tuple(x.strip() for x in args.settings.split(",") if x.strip())
    opts = EvalOptions(
        data=args.data,
        limit=args.limit,
        base=base,
        fusions=fusions,
        fusion_checkpoint=edge.fusion.checkpoint,
        fusion_weight=edge.fusion.weight,
        contrast_alpha=edge.fusion.alpha,
        schedule=edge.schedule.model_dump(),
        privacy=edge.privacy.model_dump(),
        span_policies=policies,
        top_k=edge.top_k,
        max_new_tokens=edge.max_new_tokens,
        max_gold_tokens=args.max_gold_tokens,
        edge_prompt_tokens=edge.max_prompt_tokens,
        temperature=edge.sampling.temperature,
        top_p=edge.sampling.top_p,
        seed=args.seed,  # EvalOptions takes no None (random), which the flag cannot give either
        batch=args.batch,
        large_model=cloud.large_model,
        small_model=edge.small_model,
        json_path=args.json_path,
        outputs_path=args.outputs,
        judge_url=args.judge_url,
        judge_model=args.judge_model,
        judge_api_key=os.environ.get(args.judge_key_env) if args.judge_url else None,
    )
    opts.validate()  # before loading anything
    bar, update = progress_bar()
    with bar:
        report = run_eval(opts, update)
    json_path = Path(args.json_path)
    write_json(str(json_path), report)
    json_path.with_suffix(".md").write_text(markdown_table(report) + "\n", encoding="utf-8")
    plot(report, json_path.with_suffix(".png"))
    print(f"cogenesis eval: {report['records']} records of {args.data}, {report['seconds']:.0f} s")
    print(markdown_table(report))
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {json_path.with_suffix('.png')}")
    return 1 if any(r["failed"] for r in report["settings"]) else 0
