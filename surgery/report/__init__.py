"""What a Program or an output is, for people: the validate report and provenance (summary.py),
the model card (card.py), and the layer-map view and plot (show.py)."""
