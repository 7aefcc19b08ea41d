"""mixSGA: mixture of weight-shared heterogeneous group-attention experts."""

from mixsga.budget import kv_budget, mixsga_kv_bytes_per_token, full_kv_bytes_per_token

__all__ = ["kv_budget", "mixsga_kv_bytes_per_token", "full_kv_bytes_per_token"]
