"""Reward kinds, one module per family (see ``dancegrpo_rewards.registry``)."""
