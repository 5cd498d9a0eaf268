"""Provenance of a checkpoint: what went in and what came out, by sha256 (`hashes`), and the
check that a checkpoint is still what its manifest says (`verify`)."""
