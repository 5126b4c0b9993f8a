"""Plans: a pipeline planned against a source from headers alone, and the fingerprint that identifies it."""
