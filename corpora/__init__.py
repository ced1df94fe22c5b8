"""Corpus and probe generators (no Spark): the BBC demo corpus and the long-tail facts corpus."""
