"""Core: tracing and evaluating mods, argument checks, warnings, and the NaN-aware merge rule every
layer above shares."""
