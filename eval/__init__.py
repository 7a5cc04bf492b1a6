"""Evaluation utilities for distilled vision-language models.

- :mod:`eval.metrics` holds pure metric functions (VQA accuracy, POPE, CHAIR) that
  operate on already-generated model outputs, so they can be unit-tested without
  loading any model.
- :mod:`eval.report` turns per-artifact metric dicts into a Markdown table, a
  grouped bar chart and a ``results.json`` dump.
"""
