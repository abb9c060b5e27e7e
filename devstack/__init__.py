"""Local tooling: the Kafka + Redis stack, the local Prometheus, the dataset replayer and the demo."""
