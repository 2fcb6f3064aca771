"""Textual Pilot tests of the console."""
