"""``streamer bench``: throughput, latency and memory of the service, measured in one run.

One module per measurement: ``ceiling`` (forward passes on ready tensors),
``engine`` (bytes -> top-k through the real workers, no Kafka), ``e2e`` (Kafka ->
service subprocess -> Kafka, and the same for the ``naive`` baseline),
``latency`` (steady-rate load), ``soak`` (RSS over time), ``metrics_cost``.
``runner`` runs them in order and ``report`` writes JSON, PNG plots and a
markdown table. Benchmarks report numbers; tests assert behaviour.
"""
