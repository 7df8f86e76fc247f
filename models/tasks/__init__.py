"""Training and evaluation tasks: each makes batches and scores a model's outputs on them."""
