"""Measuring models and deciding: held-out evaluation, judges, utility benchmarks, intervals, the
controls and the verdict, the tamper check."""
