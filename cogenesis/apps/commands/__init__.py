"""The ``cogenesis`` subcommands: each module adds its parser(s) to the CLI (``register``), with the
handler that runs them."""
