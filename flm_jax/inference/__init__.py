"""Inference: generation from a checkpoint's parameters."""
