"""The bus between edge and cloud (Redis) and the lifecycle of a local cluster (Redis + Ray + Serve)."""
