"""``cogenesis models``: prepare, derive and inspect the embedded models."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "models",
        help="prepare, derive and inspect the embedded models",
        description="Manage the embedded models (cached under $COGENESIS_HOME, default ~/.cache/cogenesis).",
    )
    msub = p.add_subparsers(dest="models_cmd", required=True, metavar="{prepare,derive-small,info}")
    msub.add_parser("prepare", help="convert the embedded GGUF and derive the small model (idempotent)")
    d = msub.add_parser(
        "derive-small",
        help="derive the small model from the large one by layer pruning",
        description=(
            "Remove decoder layers from the large model. --search recorded drops the recorded layers "
            "(14-18 and 26; fast, identical everywhere); --search greedy removes one layer at a time, "
            "each time the one that hurts perplexity on --data's gold answers least (slow: minutes per "
            "layer on 2 cores)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--search", choices=["recorded", "greedy"], default="recorded", help="how layers are chosen")
    d.add_argument("--keep", type=int, default=24, help="layers to keep (greedy search)")
    d.add_argument(
        "--data", default=None, help="CoGenesis JSON whose gold answers calibrate/measure (None: the shipped sample)"
    )
    d.add_argument("--records", type=int, default=8, help="records used for calibration and measurement")
    d.add_argument("--out", default=None, help="output directory (default: the cache's small-model directory)")
    msub.add_parser("info", help="show model paths, derivations and measured quality")
    p.set_defaults(handler=run)


def run(args) -> int:
    from cogenesis.apps import model_tools

    return model_tools.run(args)
