"""Trainer patches: what trl's trainers need to run llmctl's stages (stage modules read as
workflows; the machinery lives here)."""
