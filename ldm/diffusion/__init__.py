"""Diffusion maths: noise schedules, the training objective, samplers and guidance (plain torch)."""
