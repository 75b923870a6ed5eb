"""Running an audit store: retention and partitions, baselines, tamper evidence (seal and verify),
erasure, health checks, and the metrics hook they report to."""
