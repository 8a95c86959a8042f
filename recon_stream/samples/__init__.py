"""Bundled sample data for demos without a Shodan key (invented, never real results)."""
