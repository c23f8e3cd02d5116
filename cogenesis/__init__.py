"""CoGenesis Serve core: typed messages, fusion and sampling math, prompts, data, models.

The runtime roles live beside this package: ``deployments`` (cloud, Ray Serve),
``cluster`` (Redis bus and local cluster lifecycle) and ``edge_sim`` (simulated devices).
"""

__version__ = "0.1.0"
