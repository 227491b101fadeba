"""Profiles: the LMDB store and its writer, keys and records, the event index, the profile
writes and ingestion, and the profile, token, consent and event methods."""
