"""Evaluation: normalized scores against bespoke policies with bootstrap intervals, and plots."""
