"""``cogenesis train-fusion``: train the learned logits fusion on gold answers."""

from __future__ import annotations

import argparse

from cogenesis.apps.commands.common import add_gold_tokens_flag
from cogenesis.apps.flags import TRAIN_FUSION


def register(sub) -> None:
    p = sub.add_parser(
        "train-fusion",
        help="train the learned logits fusion on gold answers (checkpoint for --fusion learned)",
        description=(
            "Teacher-force every record's gold answer through the small model WITH the private context and "
            "the large model WITHOUT it, keep both top-k per position, and train the fusion weight "
            "w = sigmoid(MLP(...)) to maximise the gold token's probability under w*z_small + (1-w)*z_large "
            "(gold token kept in the candidate set). Records are split into train/dev; the best dev epoch "
            "is saved, with its config and training history, to --out. Use it with "
            "`--fusion learned --fusion-checkpoint OUT`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="CoGenesis JSON with gold answers (e.g. context_aware_dev.json)")
    p.add_argument("--limit", type=int, default=None, help="use the first N records (default: all)")
    p.add_argument(
        "--variant",
        choices=["compact", "paper"],
        default="compact",
        help="compact: sorted top-k logprobs + entropies (~2.5k parameters); paper: the paper's network "
        "over both vocabulary-sized top-k vectors",
    )
    p.add_argument("--hidden", type=int, default=64, help="first hidden layer width (the paper: 512)")
    p.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    p.add_argument("--patience", type=int, default=5, help="stop after this many epochs without a better dev NLL")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=256, help="positions per optimiser step")
    p.add_argument("--dev-fraction", type=float, default=0.2, help="share of records held out for early stopping")
    p.add_argument("--seed", type=int, default=0, help="split and initialisation seed")
    add_gold_tokens_flag(p)
    p.add_argument("--out", default="out/fusion.pt", help="checkpoint path (a .json summary is written beside it)")
    TRAIN_FUSION.add_to(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from dataclasses import asdict

    from cogenesis.apps import fusion_train as ft
    from cogenesis.apps.commands.common import progress_bar
    from cogenesis.core.config import CloudConfig, EdgeConfig
    from cogenesis.core.data import load_records
    from cogenesis.core.models import check_same_tokenizer, load_causal_lm, resolve_model
    from cogenesis.edge_sim.engine import EdgeEngine

    opts = ft.TrainOptions(
        variant=args.variant,
        hidden=args.hidden,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        dev_fraction=args.dev_fraction,
        seed=args.seed,
    )
    opts.validate()
    edge, cloud = TRAIN_FUSION.config(args, EdgeConfig), TRAIN_FUSION.config(args, CloudConfig)
    records = load_records(args.data, args.limit)
    bar, update = progress_bar()
    with bar:
        update("loading models", 0, 1)
        large, ltok = load_causal_lm(resolve_model(cloud.large_model))
        small, stok = load_causal_lm(resolve_model(edge.small_model))
        check_same_tokenizer(ltok, stok)
        positions = ft.extract(
            small,
            large,
            stok,
            ltok,
            EdgeEngine(small, stok, edge.max_prompt_tokens),
            records,
            edge.top_k,
            args.max_gold_tokens,
            lambda s, d, n: update(f"extracting top-{edge.top_k}", d, n),
        )
        result = ft.train(
            positions, small.config.vocab_size, edge.top_k, opts, lambda s, d, n: update("training", d, n)
        )
    meta = {
        "data": args.data,
        "records": len(set(positions.record.tolist())),
        "small_model": edge.small_model,
        "large_model": cloud.large_model,
        "max_gold_tokens": args.max_gold_tokens,
        "edge_prompt_tokens": edge.max_prompt_tokens,
        "options": asdict(opts),
    }
    path, json_path = ft.save_result(result, args.out, meta)
    best = result.history[result.best_epoch]["dev_nll"]
    print(
        f"{opts.variant} fusion network ({result.net.n_parameters():,} parameters), {result.train_positions} train / "
        f"{result.dev_positions} dev positions from {meta['records']} records"
    )
    print(
        f"dev NLL/token over candidates: learned {best:.4f} (epoch {result.best_epoch}); fixed w: "
        + ", ".join(f"{k.removeprefix('constant_')} {v:.4f}" for k, v in result.baselines.items())
    )
    print(f"wrote {path} and {json_path}")
    print(f"use it: --fusion learned --fusion-checkpoint {path}")
    return 0
