"""Applications on top of the roles: the ``cogenesis`` CLI and its commands (demo, bench, eval,
train-fusion, top, dashboard, models). They may import every layer below them."""
