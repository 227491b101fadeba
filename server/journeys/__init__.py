"""Journeys: the journey engine (today it follows the event log and evaluates nothing)."""
