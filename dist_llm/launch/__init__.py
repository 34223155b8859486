"""Launchers that start dist-llm stages: submitit (submit.py), accelerate (accelerate.py)."""
