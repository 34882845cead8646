"""Generation and evaluation with recurrent state (GDN state + conv tail + KV cache)."""
