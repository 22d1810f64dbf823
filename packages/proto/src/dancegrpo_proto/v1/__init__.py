"""Generated stubs of ``dancegrpo/rewards/v1/rewards.proto`` (regenerate with ``make proto``)."""
