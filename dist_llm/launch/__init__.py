"""Launchers that start dist-llm stages: submitit (submit.py runs on the login node, job.py on every task)."""
