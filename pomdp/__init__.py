"""Partially observed control tasks where memory matters: policy bodies with and without memory
compared on the same inputs (``python -m pomdp.cartpole``)."""
