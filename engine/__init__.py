"""The federated-learning engine of fltui: client, reference server, training, events.

Nothing here imports fltui, textual or rich.
"""
