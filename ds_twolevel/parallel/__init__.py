"""Process layout, collectives, agreement and liveness."""
