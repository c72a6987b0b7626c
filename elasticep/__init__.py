"""elasticep: fault-tolerant, elastic expert parallelism for MoE inference."""

__version__ = "0.1.0"
