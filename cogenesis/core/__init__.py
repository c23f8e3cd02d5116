"""The core every role shares: typed wire protocol, fusion and sampling math, prompts, data, models,
config, metric names and the private-text functions. It imports no role and no application."""
