"""Safety: moderation, refusal detection, safety evals and the release gate."""
