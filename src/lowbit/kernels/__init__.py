"""Fast twins of primitives for this CPU."""
