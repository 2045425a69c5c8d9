"""Corpora: the Russian demo corpus from Debian packages; corpus -> indexed dataset."""
