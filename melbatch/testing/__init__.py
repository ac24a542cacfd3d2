"""Archives generated on the spot for the demo, the tests and the benchmarks (:mod:`.archives`:
engines, voices, mixtures, the bad-input corpus, field shifts of real recordings)."""
