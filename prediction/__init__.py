"""Prediction on unlabelled images (`folder`: test.py --input) and the web demo's page logic (`demo`: app.py)."""
